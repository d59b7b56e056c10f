"""Read a GGUF file's header (metadata, tensor names, shapes, types and offsets), and the raw bytes
of one tensor.

Files with types beyond F32/F16/Q4_0/Q4_1/Q8_0 are read with `tensor_bytes` and
parallm/models/gguf_quants.py rather than `mx.load`, which (mlx 0.32) decodes every second run of
a Q4_K tensor wrongly without an error, dequantizes Q6_K to float16 and fails on Q5_x. This header
is also what lets the loader refuse unsupported types by name, and notice a truncated file,
before reading any tensor data.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", version (u32),
tensor count, metadata count, metadata key/values, tensor infos, padding to `general.alignment`,
then the tensor data. All little-endian.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from parallm.models.load_errors import ModelLoadError

GGUF_MAGIC = b"GGUF"

# ggml tensor type id -> (name, elements per block, bytes per block). Block sizes are needed to
# compute where the data must end; names are for error messages.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# The tensor types parallm reads (parallm/models/gguf_quants.py says how each becomes MLX arrays).
# IQ*, TQ*, MXFP4 and the 8-bit intermediates are refused: they are non-linear codebooks or not
# used for weights, and requantizing them to MLX's affine grid would lose what the file encodes.
SUPPORTED_TYPES = ("Q4_0", "Q4_1", "Q8_0", "F16", "F32", "BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")

# general.file_type (llama.cpp's LLAMA_FTYPE) -> name, for messages about the file as a whole.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

# metadata value type id -> struct format for the fixed-size ones
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # in GGUF order: the fastest-varying dimension first
    type_id: int
    offset: int  # relative to the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}", 0, 0))[0]

    @property
    def nbytes(self) -> int | None:
        """Bytes of data, or None for a type whose block size we do not know."""
        if self.type_id not in GGML_TYPES:
            return None
        _, block_elems, block_bytes = GGML_TYPES[self.type_id]
        n = 1
        for d in self.shape:
            n *= d
        return n // block_elems * block_bytes


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict  # key -> value; long arrays (vocabulary, merges) are skipped, see _SKIP_ARRAYS
    tensors: list[GGUFTensorInfo]
    data_offset: int  # where tensor data starts in the file
    file_size: int

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def file_type_name(self) -> str | None:
        ft = self.metadata.get("general.file_type")
        return None if ft is None else FILE_TYPES.get(ft, f"file type {ft}")

    def unsupported_tensors(self) -> list[GGUFTensorInfo]:
        return [t for t in self.tensors if t.type_name not in SUPPORTED_TYPES]

    def ragged_tensors(self) -> list[GGUFTensorInfo]:
        """Tensors whose rows are not a whole number of blocks (e.g. a K-quant matrix 64 wide):
        invalid GGUF, which llama.cpp refuses too."""
        return [t for t in self.tensors if t.type_id in GGML_TYPES and t.shape
                and t.shape[0] % GGML_TYPES[t.type_id][1] != 0]

    def expected_size(self) -> int:
        """The smallest file size that holds every tensor whose size we can compute."""
        ends = [self.data_offset + t.offset + t.nbytes for t in self.tensors if t.nbytes is not None]
        return max(ends, default=self.data_offset)

    def weight_bytes(self) -> int:
        return sum(t.nbytes or 0 for t in self.tensors)


# Arrays read only to skip over them: the header reader does not need the vocabulary.
_SKIP_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.scores")


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelLoadError(
                f"{self.path}: the GGUF header is cut short (the file is truncated or not a GGUF "
                f"file). Accepted: a complete GGUF file.")
        return b

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self, keep: bool = True) -> str | None:
        n = self.scalar("<Q")
        if n > 1 << 30:
            raise ModelLoadError(f"{self.path}: corrupt GGUF header (a string of {n} bytes)")
        if not keep:
            self.f.seek(n, 1)
            return None
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, type_id: int, keep: bool = True):
        if type_id in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALAR_FORMATS:  # one read for the whole array (token types, scores)
                fmt = _SCALAR_FORMATS[item_type]
                if not keep:
                    self.f.seek(count * struct.calcsize(fmt), 1)
                    return None
                return list(struct.unpack(f"<{count}{fmt[1]}", self.read(count * struct.calcsize(fmt))))
            if item_type == _STRING:
                items = [self.string(keep) for _ in range(count)]
                return items if keep else None
            items = [self.value(item_type) for _ in range(count)]
            return items if keep else None
        raise ModelLoadError(f"{self.path}: corrupt GGUF header (metadata value type {type_id})")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf_header(path: str | Path, *, vocabulary: bool = False) -> GGUFHeader:
    """Parse the header. Raises ModelLoadError for a file that is not GGUF or is cut short. With
    `vocabulary`, the tokenizer arrays (tokens, merges, token types, scores) are kept too."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if f.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic bytes)")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (accepted: 2, 3)")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"), keep=vocabulary or key not in _SKIP_ARRAYS)
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            shape = tuple(r.scalar("<Q") for _ in range(n_dims))
            tensors.append(GGUFTensorInfo(name, shape, r.scalar("<I"), r.scalar("<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        data_offset = -(-f.tell() // alignment) * alignment
    return GGUFHeader(path, version, metadata, tensors, data_offset, file_size)


def tensor_bytes(header: GGUFHeader, info: GGUFTensorInfo):
    """The tensor's raw data as a read-only uint8 numpy array, (rows, bytes per row) for a matrix;
    memory-mapped, so only what the caller touches is read."""
    import numpy as np

    n = info.nbytes
    if n is None:
        raise ModelLoadError(f"{header.path}: tensor {info.name} has unknown type {info.type_name}")
    data = np.memmap(header.path, dtype=np.uint8, mode="r", offset=header.data_offset + info.offset, shape=(n,))
    rows = 1
    for d in info.shape[1:]:
        rows *= d
    return data.reshape(rows, n // rows) if rows else data.reshape(0, 0)


def tensor_named(header: GGUFHeader, name: str) -> GGUFTensorInfo | None:
    return next((t for t in header.tensors if t.name == name), None)
