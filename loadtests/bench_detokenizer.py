"""Micro-benchmark: parallm's IncrementalDetokenizer vs mlx-lm's BPEStreamingDetokenizer.

    PYTHONPATH=. python loadtests/bench_detokenizer.py [--tokenizer tests/assets/tok] [--rounds 5]

Streams the same token ids (multilingual text with emoji) through each, one token at a time,
reading the new text after every token as a server would. Prints microseconds per token (median
of interleaved rounds), the ratio, and whether each one's text equals tokenizer.decode.
"""
from __future__ import annotations

import argparse
import statistics
import time

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
from transformers import AutoTokenizer

from parallm.engine.detokenizer import IncrementalDetokenizer, TokenDecoder

TEXT = (" Hello wörld, naïve café! 😀🎉👍🏽 日本語のテキスト, 中文文本, 한국어. "
        "Ελληνικά, русский, עברית. tabs\tand\nnew lines; code: x = f(y) + 1\n")


def run_parallm(decoder: TokenDecoder, ids: list[int]) -> str:
    det = IncrementalDetokenizer(decoder)
    parts = [det.add(i) for i in ids]
    parts.append(det.flush())
    return "".join(parts)


def run_mlx_lm(detok: BPEStreamingDetokenizer, ids: list[int]) -> str:
    detok.reset()
    parts = []
    for i in ids:
        detok.add_token(i)
        parts.append(detok.last_segment)
    detok.finalize()
    parts.append(detok.last_segment)
    return "".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="tests/assets/tok")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat-text", type=int, default=100)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = tok.encode(TEXT * args.repeat_text, add_special_tokens=False)
    reference = tok.decode(ids)
    ours = TokenDecoder.for_tokenizer(tok)
    window = TokenDecoder(tok, strategy="window")
    theirs = BPEStreamingDetokenizer(tok)
    runs = {"parallm byte table": lambda: run_parallm(ours, ids),
            "parallm window": lambda: run_parallm(window, ids),
            "mlx-lm BPEStreamingDetokenizer": lambda: run_mlx_lm(theirs, ids)}
    times = {name: [] for name in runs}
    texts = {}
    for _ in range(args.rounds):  # interleaved
        for name, fn in runs.items():
            start = time.perf_counter()
            texts[name] = fn()
            times[name].append((time.perf_counter() - start) / len(ids) * 1e6)
    base = statistics.median(times["mlx-lm BPEStreamingDetokenizer"])
    print(f"{len(ids)} tokens, median of {args.rounds} interleaved rounds")
    for name, values in times.items():
        us = statistics.median(values)
        print(f"{name:32s} {us:7.2f} us/token  {base / us:5.2f}x vs mlx-lm  "
              f"equals decode: {texts[name] == reference}")


if __name__ == "__main__":
    main()
