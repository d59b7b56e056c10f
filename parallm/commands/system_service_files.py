"""The files that make `parallm serve` a service: a launchd agent plist (macOS) and a systemd user
unit (Linux). Pure rendering: nothing here touches the filesystem or runs a command."""
from __future__ import annotations

import plistlib
import re
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHD_LABEL = "dev.parallm.serve"
SYSTEMD_UNIT_NAME = "parallm.service"
# Seconds the service manager waits after SIGTERM before SIGKILL, beyond the server's own drain
# timeout: time for uvicorn to close sockets and the engine worker to stop.
STOP_GRACE_S = 15


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs. `argv` is absolute ([/path/to/parallm, "serve", ...])."""

    argv: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    working_directory: Path = Path("/")
    stdout_path: Path = Path("/dev/null")  # launchd only; systemd logs to the journal
    stderr_path: Path = Path("/dev/null")
    drain_timeout_s: float = 30.0

    @property
    def stop_timeout_s(self) -> int:
        return int(self.drain_timeout_s + 0.999) + STOP_GRACE_S


def render_launchd_plist(spec: ServiceSpec) -> bytes:
    """A per-user launchd agent: started at login (RunAtLoad), restarted whenever it exits
    (KeepAlive), SIGTERM then ExitTimeOut seconds before SIGKILL."""
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(spec.argv),
        "RunAtLoad": True,
        "KeepAlive": True,
        "WorkingDirectory": str(spec.working_directory),
        "StandardOutPath": str(spec.stdout_path),
        "StandardErrorPath": str(spec.stderr_path),
        "EnvironmentVariables": dict(spec.environment),
        "ExitTimeOut": spec.stop_timeout_s,
        "ThrottleInterval": 10,  # at most one restart per 10 s if it keeps crashing
        "ProcessType": "Interactive",  # not throttled to efficiency cores: it serves requests
    }
    return plistlib.dumps(agent, sort_keys=False)


# systemd's command-line syntax: words split on whitespace, double quotes group, backslash escapes
# inside quotes, `%` starts a specifier and `$` an environment substitution in Exec lines.
_SYSTEMD_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./:=@+,-]+")


def systemd_quote(arg: str, *, exec_line: bool = True) -> str:
    """One argument as systemd will read it back verbatim."""
    if "\n" in arg or "\r" in arg or "\0" in arg:
        raise ValueError(f"a service argument cannot hold a newline or NUL: {arg!r}")
    escaped = arg.replace("%", "%%")
    if exec_line:
        escaped = escaped.replace("$", "$$")
    if _SYSTEMD_PLAIN_WORD.fullmatch(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd_unit(spec: ServiceSpec) -> str:
    exec_start = " ".join(systemd_quote(a) for a in spec.argv)
    env_lines = "".join(f"Environment={systemd_quote(f'{k}={v}', exec_line=False)}\n"
                        for k, v in spec.environment.items())
    return (
        "[Unit]\n"
        "Description=parallm LLM inference server (parallm serve)\n"
        "After=network.target\n"
        "\n"
        "[Service]\n"
        "Type=exec\n"
        f"ExecStart={exec_start}\n"
        # WorkingDirectory= takes the rest of the line as the path (no quote removal); only
        # specifiers need escaping.
        f"WorkingDirectory={str(spec.working_directory).replace('%', '%%')}\n"
        f"{env_lines}"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "# parallm serve drains on SIGTERM (finishes running requests) and exits 0.\n"
        "KillSignal=SIGTERM\n"
        "KillMode=mixed\n"
        f"TimeoutStopSec={spec.stop_timeout_s}\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )
