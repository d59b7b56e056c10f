"""Zero the CUDA device code in a shared library that a given GPU architecture will not load.

MLX's CUDA wheel carries its kernels for sm_75, 80, 90, 100, 120 and 121 as SASS plus PTX for 120
(libmlx.so: a 67 MB .nv_fatbin of its 119 MB). The driver picks the entry matching the device, so
on an H100/H200 (sm_90) the others are never read. Zeroing their payloads in place keeps every
offset and header valid and lets xz squeeze the wheel from 90 MB to ~20 MB, small enough to carry
to the lent GPU machine in one call together with everything else (loadtests/gpu/bundle.sh).
Dev tooling only: the product never runs this.

  python loadtests/gpu/prune_fatbin.py LIBRARY [--keep-sm 90]
"""
from __future__ import annotations

import argparse
import struct
import subprocess

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def fatbin_section(path: str) -> tuple[int, int]:
    """(file offset, size) of the .nv_fatbin section, read with readelf."""
    for line in subprocess.check_output(["readelf", "-SW", path], text=True).splitlines():
        parts = line.replace("[ ", "[").split()
        if ".nv_fatbin" in parts:
            i = parts.index(".nv_fatbin")
            return int(parts[i + 3], 16), int(parts[i + 4], 16)
    raise SystemExit(f"{path}: no .nv_fatbin section")


def prune(data: bytearray, start: int, end: int, keep_sm: int) -> tuple[int, int]:
    """Zero every entry but the SASS (ELF) for `keep_sm`; returns (bytes kept, bytes zeroed)."""
    kept = zeroed = 0
    pos = start
    while pos < end:
        magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned inside the section
            continue
        entry, body_end = pos + header_size, pos + header_size + body_size
        while entry < body_end:
            kind, _unused, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind == KIND_ELF and arch == keep_sm:
                kept += payload
            else:
                data[entry + entry_header: entry + entry_header + payload] = bytes(payload)
                zeroed += payload
            entry += entry_header + payload
        pos = body_end
    return kept, zeroed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library")
    p.add_argument("--keep-sm", type=int, default=90)
    args = p.parse_args()
    start, size = fatbin_section(args.library)
    with open(args.library, "rb") as f:
        data = bytearray(f.read())
    kept, zeroed = prune(data, start, start + size, args.keep_sm)
    if kept == 0:
        raise SystemExit(f"no sm_{args.keep_sm} code found: left {args.library} unchanged")
    with open(args.library, "wb") as f:
        f.write(data)
    print(f"{args.library}: kept {kept / 1e6:.1f} MB of sm_{args.keep_sm} code, zeroed {zeroed / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
