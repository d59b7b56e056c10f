"""Summarize a py-spy raw profile (`py-spy record --threads -f raw`): samples per thread, and per
thread the frames where those samples sat (self) and the parallm/mlx frames they passed through.

With `--gil` only the thread holding the GIL is sampled, so samples per thread over the whole are
each thread's share of the GIL; without it they are its share of wall time (GIL or not).

  python loadtests/pyspy_summary.py OUT/gil-held.txt [--top 12]
"""
from __future__ import annotations

import argparse
import collections
import sys


def summarize(lines, top: int) -> list[str]:
    per_thread: collections.Counter = collections.Counter()
    leaf: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ours: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith("thread") else "(unnamed)"
        per_thread[thread] += n
        leaf[thread][frames[-1]] += n
        for frame in dict.fromkeys(f for f in frames if "parallm/" in f or "mlx" in f):
            ours[thread][frame] += n
    total = sum(per_thread.values()) or 1
    out = [f"samples {total}: " + ", ".join(f"{t} {n} ({n / total:.0%})" for t, n in per_thread.most_common())]
    for thread, n in per_thread.most_common():
        out.append(f"-- {thread}: top self frames")
        out += [f"   {c:6d}  {f}" for f, c in leaf[thread].most_common(top)]
        out.append(f"-- {thread}: parallm/mlx frames on the stack")
        out += [f"   {c:6d}  {f}" for f, c in ours[thread].most_common(top)]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    with open(args.path) as f:
        print("\n".join(summarize(f, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
