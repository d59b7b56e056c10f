"""The `parallm` command. Each subcommand lives in its own module with add_arguments(parser) and
run(args) -> int; this file only wires them together."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Modules are imported lazily so `parallm --help` stays fast.
SUBCOMMANDS = {
    "serve": ("parallm.commands.serve", "serve models over an OpenAI-compatible HTTP API"),
    "info": ("parallm.commands.info", "load a model and print what it is and what it needs"),
    "service": ("parallm.commands.system_service", "install a launchd/systemd service that runs `parallm serve`"),
    "jobs": ("parallm.commands.job_listing", "list fine-tuning jobs and their progress (or one job's events)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallm", description="An LLM inference server on MLX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # not written yet
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
