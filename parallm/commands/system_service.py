"""`parallm service install | uninstall | status [--print] [-- serve args...]`.

macOS: a launchd agent ~/Library/LaunchAgents/dev.parallm.serve.plist, loaded with
`launchctl bootstrap gui/$UID`. Linux: a systemd user unit ~/.config/systemd/user/parallm.service,
started with `systemctl --user enable --now`. Both run `<abs path>/parallm serve <args>`.

For tests (and for preparing files for another machine) the platform is `--platform`, the home
directory is $PARALLM_SERVICE_HOME, and the command runner is a parameter of `run()`.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from parallm.commands.system_service_files import (LAUNCHD_LABEL, SYSTEMD_UNIT_NAME, ServiceSpec,
                                          render_launchd_plist, render_systemd_unit)

HOME_ENV = "PARALLM_SERVICE_HOME"
PLATFORMS = ("macos", "linux")
DEFAULT_DRAIN_TIMEOUT_S = 30.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Environment the service always gets: unbuffered output so log lines reach the log promptly.
BASE_ENVIRONMENT = {"PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Sequence[str]], CommandResult]


def subprocess_runner(argv: Sequence[str]) -> CommandResult:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    return CommandResult(done.returncode, done.stdout, done.stderr)


def _printing_runner(out: Callable[[str], None]) -> Runner:
    def run_nothing(argv: Sequence[str]) -> CommandResult:
        out(f"not run (${HOME_ENV} is set): {' '.join(argv)}")
        return CommandResult(0)
    return run_nothing


class ServiceError(Exception):
    """A problem the user can fix; printed without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # One sub-parser per action, so options may come after the action and everything after
    # `--` goes to `parallm serve` untouched.
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (("install", "write the service file and start the service"),
                            ("uninstall", "stop the service and remove its file"),
                            ("status", "say whether the service is installed and running")):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--platform", choices=("auto",) + PLATFORMS, default="auto",
                         help="service manager to target: macos (launchd) or linux (systemd); "
                              "default: this machine's")
        if name == "status":
            sub.add_argument("--print", dest="print_only", action="store_true",
                             help="also print the installed service file")
        if name != "install":
            continue
        sub.add_argument("--print", dest="print_only", action="store_true",
                         help="print the service file instead of installing it")
        sub.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                         help="environment variable for the service (repeatable); NAME alone "
                              "copies its current value, e.g. --env PARALLM_API_KEY")
        sub.add_argument("--log-dir", type=Path, default=None,
                         help="macOS: where stdout/stderr go (default ~/Library/Logs/parallm); "
                              "Linux logs go to the journal (journalctl --user -u parallm)")
        sub.add_argument("--working-dir", type=Path, default=None,
                         help="the service's working directory (default: the home directory)")
        sub.add_argument("serve_args", nargs=argparse.REMAINDER, metavar="-- SERVE_ARGS",
                         help="the arguments for `parallm serve`, after `--`")


def run(args: argparse.Namespace, runner: Optional[Runner] = None,
        out: Callable[[str], None] = print) -> int:
    """`runner` runs launchctl/systemctl. By default it is the real one, except under a
    $PARALLM_SERVICE_HOME other than the real home: the service manager would not look there, so
    the commands are printed instead of run (this also keeps tests off the real manager)."""
    if runner is None:
        runner = subprocess_runner if service_home() == Path.home().resolve() else _printing_runner(out)
    try:
        return _run(args, runner, out)
    except ServiceError as e:
        print(f"parallm service: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, runner: Runner, out: Callable[[str], None]) -> int:
    platform = resolve_platform(args.platform)
    home = service_home()
    path = service_file_path(platform, home)
    if args.action == "status":
        return _status(platform, path, runner, out, show_file=getattr(args, "print_only", False))
    if args.action == "uninstall":
        return _uninstall(platform, path, runner, out)
    spec = build_spec(args, platform, home)
    content = render(platform, spec)
    if args.print_only:
        out(content)
        return 0
    return _install(platform, path, content, spec, runner, out)


def resolve_platform(choice: str) -> str:
    if choice != "auto":
        return choice
    if sys.platform == "darwin":
        return "macos"
    if sys.platform.startswith("linux"):
        return "linux"
    raise ServiceError(f"no service manager support for {sys.platform}; use --platform macos|linux "
                       "with --print to write the file for another machine")


def service_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home()).expanduser().resolve()


def service_file_path(platform: str, home: Path) -> Path:
    if platform == "macos":
        return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    return home / ".config" / "systemd" / "user" / SYSTEMD_UNIT_NAME


def parallm_executable() -> list[str]:
    """An absolute command for parallm: the console script next to this interpreter when it
    exists (the venv's), else this interpreter running the package."""
    script = Path(sys.executable).parent / "parallm"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "parallm"]


def build_spec(args: argparse.Namespace, platform: str, home: Path) -> ServiceSpec:
    serve_args = list(args.serve_args)
    if serve_args[:1] == ["--"]:
        serve_args = serve_args[1:]
    elif serve_args:
        raise ServiceError(f"put the arguments for `parallm serve` after `--`: "
                           f"parallm service install [options] -- {' '.join(serve_args)}")
    log_dir = (args.log_dir or home / "Library" / "Logs" / "parallm").expanduser().absolute()
    return ServiceSpec(
        argv=tuple(parallm_executable() + ["serve"] + serve_args),
        environment={**BASE_ENVIRONMENT, **parse_environment(args.env)},
        working_directory=(args.working_dir or home).expanduser().absolute(),
        stdout_path=log_dir / "serve.log",
        stderr_path=log_dir / "serve.err.log",
        drain_timeout_s=drain_timeout_from(serve_args),
    )


def parse_environment(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise ServiceError(f"--env {item!r}: expected NAME=VALUE or NAME (letters, digits, _)")
        if not sep:
            if name not in os.environ:
                raise ServiceError(f"--env {name}: not set in this shell; give NAME=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


def drain_timeout_from(serve_args: Sequence[str]) -> float:
    """The serve arguments' --drain-timeout (so the manager waits long enough before SIGKILL)."""
    for i, arg in enumerate(serve_args):
        value = None
        if arg == "--drain-timeout" and i + 1 < len(serve_args):
            value = serve_args[i + 1]
        elif arg.startswith("--drain-timeout="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                raise ServiceError(f"--drain-timeout {value!r}: expected a number of seconds") from None
    return DEFAULT_DRAIN_TIMEOUT_S


def render(platform: str, spec: ServiceSpec) -> str:
    if platform == "macos":
        return render_launchd_plist(spec).decode()
    return render_systemd_unit(spec)


def _write_private(path: Path, content: str) -> None:
    """Mode 0600: the file may hold an API key from --env."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(path, 0o600)


def _check(result: CommandResult, argv: Sequence[str]) -> None:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise ServiceError(f"`{' '.join(argv)}` failed ({result.returncode}): {detail}")


def _launchd_domain() -> str:
    return f"gui/{os.getuid()}"


def _install(platform: str, path: Path, content: str, spec: ServiceSpec, runner: Runner,
             out: Callable[[str], None]) -> int:
    _write_private(path, content)
    if platform == "macos":
        Path(spec.stdout_path).parent.mkdir(parents=True, exist_ok=True)
        # Reinstalling replaces a loaded agent: unload it first (fails harmlessly if not loaded).
        runner(["launchctl", "bootout", f"{_launchd_domain()}/{LAUNCHD_LABEL}"])
        boot = ["launchctl", "bootstrap", _launchd_domain(), str(path)]
        result = runner(boot)
        if result.returncode != 0:  # macOS before 10.11 has no bootstrap; load -w does the same
            legacy = ["launchctl", "load", "-w", str(path)]
            _check(runner(legacy), legacy)
        out(f"installed {path}\nlogs: {spec.stdout_path} and {spec.stderr_path}")
    else:
        for argv in (["systemctl", "--user", "daemon-reload"],
                     ["systemctl", "--user", "enable", SYSTEMD_UNIT_NAME],
                     # restart, not start: a reinstall must pick up the new arguments
                     ["systemctl", "--user", "restart", SYSTEMD_UNIT_NAME]):
            _check(runner(argv), argv)
        out(f"installed {path}\nlogs: journalctl --user -u {SYSTEMD_UNIT_NAME}\n"
            "to keep it running after you log out: loginctl enable-linger $USER")
    return 0


def _uninstall(platform: str, path: Path, runner: Runner, out: Callable[[str], None]) -> int:
    if platform == "macos":
        runner(["launchctl", "bootout", f"{_launchd_domain()}/{LAUNCHD_LABEL}"])
    elif path.exists():
        runner(["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT_NAME])
    existed = path.exists()
    path.unlink(missing_ok=True)
    if platform == "linux" and existed:
        runner(["systemctl", "--user", "daemon-reload"])
    out(f"removed {path}" if existed else f"not installed ({path} does not exist)")
    return 0


@dataclass(frozen=True)
class ServiceStatus:
    installed: bool
    running: bool
    detail: str  # the manager's word: "running", "active", "inactive", "failed", "not loaded"...
    pid: Optional[int] = None


def query_status(platform: str, path: Path, runner: Runner) -> ServiceStatus:
    installed = path.exists()
    if platform == "macos":
        result = runner(["launchctl", "print", f"{_launchd_domain()}/{LAUNCHD_LABEL}"])
        if result.returncode != 0:
            return ServiceStatus(installed, False, "not loaded")
        state = re.search(r"^\s*state = (\S+)", result.stdout, re.M)
        pid = re.search(r"^\s*pid = (\d+)", result.stdout, re.M)
        detail = state.group(1) if state else "loaded"
        return ServiceStatus(installed, detail == "running", detail,
                             int(pid.group(1)) if pid else None)
    active = runner(["systemctl", "--user", "is-active", SYSTEMD_UNIT_NAME]).stdout.strip() or "unknown"
    pid_out = runner(["systemctl", "--user", "show", "-p", "MainPID", "--value", SYSTEMD_UNIT_NAME])
    pid = int(pid_out.stdout.strip()) if pid_out.stdout.strip().isdigit() else 0
    return ServiceStatus(installed, active == "active", active, pid or None)


def _status(platform: str, path: Path, runner: Runner, out: Callable[[str], None],
            show_file: bool) -> int:
    status = query_status(platform, path, runner)
    out(f"service file: {path} ({'installed' if status.installed else 'not installed'})")
    out(f"state: {status.detail}" + (f" (pid {status.pid})" if status.pid else ""))
    if show_file and status.installed:
        out(path.read_text())
    # LSB convention, as `systemctl status`: 0 running, 3 not running.
    return 0 if status.running else 3
