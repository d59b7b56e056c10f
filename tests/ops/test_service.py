"""`parallm service`: the launchd plist and systemd unit are valid and carry the serve arguments;
install/uninstall/status drive the service manager through an injected runner. Nothing here touches
the real ~/Library or ~/.config or runs launchctl/systemctl."""
from __future__ import annotations

import argparse
import os
import plistlib
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from parallm import cli
from parallm.commands import system_service as service_command
from parallm.commands.system_service import CommandResult
from parallm.commands.system_service_files import ServiceSpec, render_systemd_unit, systemd_quote

SERVE_ARGS = ["--model", "/models/my model dir", "--port", "8001", "--drain-timeout", "20",
              "--api-key-file", "it's \"quoted\" 100%$HOME"]


class FakeRunner:
    """Records commands; answers from a table of (argv prefix -> result)."""

    def __init__(self, answers: dict[tuple[str, ...], CommandResult] | None = None):
        self.calls: list[list[str]] = []
        self.answers = answers or {}

    def __call__(self, argv):
        self.calls.append(list(argv))
        for prefix, result in self.answers.items():
            if tuple(argv[:len(prefix)]) == prefix:
                return result
        return CommandResult(0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(service_command.HOME_ENV, str(tmp_path))
    return tmp_path.resolve()


def parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["service"] + argv)


def run(argv: list[str], runner: FakeRunner) -> tuple[int, str]:
    lines: list[str] = []
    rc = service_command.run(parse(argv), runner=runner, out=lines.append)
    return rc, "\n".join(lines)


def test_macos_install_writes_a_valid_launchd_agent_and_bootstraps_it(home):
    runner = FakeRunner()
    rc, _ = run(["install", "--platform", "macos", "--env", "PARALLM_API_KEY=k-123", "--"] + SERVE_ARGS, runner)
    assert rc == 0
    path = home / "Library/LaunchAgents/dev.parallm.serve.plist"
    agent = plistlib.loads(path.read_bytes())
    assert agent["Label"] == "dev.parallm.serve"
    program = agent["ProgramArguments"]
    assert Path(program[0]).is_absolute() and Path(program[0]).exists()
    assert program[program.index("serve") + 1:] == SERVE_ARGS  # spaces, quotes, % and $ intact
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] is True
    assert agent["StandardOutPath"] == str(home / "Library/Logs/parallm/serve.log")
    assert agent["StandardErrorPath"] == str(home / "Library/Logs/parallm/serve.err.log")
    assert agent["EnvironmentVariables"]["PARALLM_API_KEY"] == "k-123"
    assert agent["ExitTimeOut"] > 20  # longer than the drain timeout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it may hold an API key
    uid = os.getuid()
    assert runner.calls == [["launchctl", "bootout", f"gui/{uid}/dev.parallm.serve"],
                            ["launchctl", "bootstrap", f"gui/{uid}", str(path)]]


def test_macos_install_falls_back_to_load_when_bootstrap_fails(home):
    runner = FakeRunner({("launchctl", "bootstrap"): CommandResult(5, "", "Bootstrap failed")})
    rc, _ = run(["install", "--platform", "macos", "--", "--port", "1"], runner)
    assert rc == 0
    assert runner.calls[-1] == ["launchctl", "load", "-w", str(home / "Library/LaunchAgents/dev.parallm.serve.plist")]


def test_failed_manager_command_is_reported(home, capsys):
    runner = FakeRunner({("systemctl", "--user", "enable"): CommandResult(1, "", "Failed to connect to bus")})
    rc, _ = run(["install", "--platform", "linux"], runner)
    assert rc == 2
    assert "Failed to connect to bus" in capsys.readouterr().err


def unit_value(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def systemd_words(exec_start: str) -> list[str]:
    """Read an ExecStart line back (systemd's quoting is POSIX-like for what we write)."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_start)]


def test_linux_install_writes_a_systemd_user_unit_and_enables_it(home):
    runner = FakeRunner()
    rc, out = run(["install", "--platform", "linux", "--env", "HF_HOME=/data/hf cache", "--"] + SERVE_ARGS, runner)
    assert rc == 0
    path = home / ".config/systemd/user/parallm.service"
    text = path.read_text()
    (exec_start,) = unit_value(text, "ExecStart")
    words = systemd_words(exec_start)
    assert Path(words[0]).is_absolute()
    assert words[words.index("serve") + 1:] == SERVE_ARGS
    assert unit_value(text, "Restart") == ["on-failure"]
    assert unit_value(text, "KillSignal") == ["SIGTERM"]
    assert int(unit_value(text, "TimeoutStopSec")[0]) > 20
    assert '"HF_HOME=/data/hf cache"' in unit_value(text, "Environment")
    assert unit_value(text, "WantedBy") == ["default.target"]
    assert runner.calls == [["systemctl", "--user", "daemon-reload"],
                            ["systemctl", "--user", "enable", "parallm.service"],
                            ["systemctl", "--user", "restart", "parallm.service"]]
    assert "journalctl --user -u parallm.service" in out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_the_unit(home, tmp_path):
    run(["install", "--platform", "linux", "--"] + SERVE_ARGS, FakeRunner())
    path = home / ".config/systemd/user/parallm.service"
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # and the check can fail: a relative ExecStart is a fatal error
    broken = tmp_path / "broken.service"
    broken.write_text(path.read_text().replace("ExecStart=/", "ExecStart="))
    bad = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0


def test_print_shows_the_file_and_installs_nothing(home, capsys):
    assert cli.main(["service", "install", "--print", "--platform", "linux", "--", "--model", "a b"]) == 0
    printed = capsys.readouterr().out
    assert "[Service]" in printed and 'serve --model "a b"' in printed
    assert not (home / ".config").exists()
    assert cli.main(["service", "install", "--platform", "macos", "--print"]) == 0
    assert plistlib.loads(capsys.readouterr().out.encode())["Label"] == "dev.parallm.serve"
    assert not (home / "Library").exists()


def test_cli_under_a_custom_home_never_runs_the_manager(home, capsys, monkeypatch):
    def forbidden(argv):
        raise AssertionError(f"ran {argv}")
    monkeypatch.setattr(service_command, "subprocess_runner", forbidden)
    assert cli.main(["service", "install", "--platform", "linux", "--", "--port", "9"]) == 0
    assert "not run ($PARALLM_SERVICE_HOME is set): systemctl --user daemon-reload" in capsys.readouterr().out
    assert (home / ".config/systemd/user/parallm.service").exists()


def test_uninstall_stops_and_removes(home):
    run(["install", "--platform", "linux"], FakeRunner())
    runner = FakeRunner()
    rc, out = run(["uninstall", "--platform", "linux"], runner)
    assert rc == 0 and not (home / ".config/systemd/user/parallm.service").exists()
    assert runner.calls == [["systemctl", "--user", "disable", "--now", "parallm.service"],
                            ["systemctl", "--user", "daemon-reload"]]
    rc, out = run(["uninstall", "--platform", "macos"], FakeRunner())
    assert rc == 0 and "not installed" in out


def test_status_linux(home):
    running = FakeRunner({("systemctl", "--user", "is-active"): CommandResult(0, "active\n"),
                          ("systemctl", "--user", "show"): CommandResult(0, "4242\n")})
    rc, out = run(["status", "--platform", "linux"], running)
    assert rc == 0  # the manager's word decides "running", the file's presence is reported apart
    assert "not installed" in out and "state: active (pid 4242)" in out
    run(["install", "--platform", "linux"], FakeRunner())
    rc, out = run(["status", "--platform", "linux", "--print"], running)
    assert rc == 0 and "(installed)" in out and "[Service]" in out
    stopped = FakeRunner({("systemctl", "--user", "is-active"): CommandResult(3, "inactive\n"),
                          ("systemctl", "--user", "show"): CommandResult(0, "0\n")})
    rc, out = run(["status", "--platform", "linux"], stopped)
    assert rc == 3 and "state: inactive" in out and "pid" not in out


def test_status_macos(home):
    printed = "gui/501/dev.parallm.serve = {\n\tstate = running\n\tpid = 777\n}\n"
    rc, out = run(["status", "--platform", "macos"], FakeRunner({("launchctl", "print"): CommandResult(0, printed)}))
    assert rc == 0 and "state: running (pid 777)" in out
    rc, out = run(["status", "--platform", "macos"], FakeRunner({("launchctl", "print"): CommandResult(113, "", "not found")}))
    assert rc == 3 and "state: not loaded" in out


def test_bad_input_gets_a_clear_error(home, capsys, monkeypatch):
    rc, _ = run(["install", "--platform", "linux", "--env", "1BAD=x"], FakeRunner())
    assert rc == 2 and "expected NAME=VALUE" in capsys.readouterr().err
    monkeypatch.delenv("PARALLM_TEST_UNSET", raising=False)
    rc, _ = run(["install", "--platform", "linux", "--env", "PARALLM_TEST_UNSET"], FakeRunner())
    assert rc == 2 and "not set in this shell" in capsys.readouterr().err
    monkeypatch.setenv("PARALLM_TEST_SET", "from-shell")
    rc, _ = run(["install", "--platform", "linux", "--env", "PARALLM_TEST_SET"], FakeRunner())
    assert rc == 0
    unit = (home / ".config/systemd/user/parallm.service").read_text()
    assert "PARALLM_TEST_SET=from-shell" in unit_value(unit, "Environment")
    with pytest.raises(SystemExit):
        parse(["install", "--model", "x"])  # serve args must follow `--`
    rc, _ = run(["install", "--platform", "linux", "--", "--drain-timeout", "soon"], FakeRunner())
    assert rc == 2 and "expected a number of seconds" in capsys.readouterr().err


def test_systemd_quote():
    assert systemd_quote("plain-arg_1.2") == "plain-arg_1.2"
    assert systemd_quote("a b") == '"a b"'
    assert systemd_quote('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert systemd_quote("100%") == '"100%%"'
    assert systemd_quote("$HOME") == '"$$HOME"'
    assert systemd_quote("$HOME", exec_line=False) == '"$HOME"'
    with pytest.raises(ValueError, match="newline"):
        systemd_quote("a\nb")
    spec = ServiceSpec(argv=("/bin/parallm", "serve"), drain_timeout_s=0)
    assert unit_value(render_systemd_unit(spec), "TimeoutStopSec") == ["15"]
