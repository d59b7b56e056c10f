"""`parallm bench <what>`: benchmarks that print ratios against mlx-lm baselines run in the same process."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# name -> module with add_arguments(parser) and run(args) (programs under loadtests/)
BENCHMARKS = {"engine": "bench_engine", "serving": "bench_serving"}


def _loadtests_module(name: str):
    root = Path(__file__).resolve().parent.parent / "loadtests"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, module_name in BENCHMARKS.items():
        try:
            module = _loadtests_module(module_name)
        except ModuleNotFoundError:
            continue
        if not hasattr(module, "add_arguments"):  # a standalone program (e.g. bench_serving): not a subcommand
            continue
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)


def run(args) -> int:
    if not getattr(args, "_bench_run", None):
        print("choose a benchmark: " + ", ".join(BENCHMARKS), file=sys.stderr)
        return 2
    return int(args._bench_run(args) or 0)
