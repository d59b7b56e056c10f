"""Settings come from defaults < TOML file < PARALLM_* env < command line; bad values are named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from parallm.cli import build_parser
from parallm.server.config import ConfigError, ServerSettings, load_settings
from parallm.server.serve_command import _OPTIONS

ROOT = Path(__file__).resolve().parents[2]


def cli_values(argv: list[str]) -> tuple[dict, str | None]:
    args = build_parser().parse_args(["serve", *argv])
    return {name: getattr(args, name) for name in _OPTIONS}, args.config


def test_defaults_are_safe():
    s = ServerSettings()
    assert s.host == "127.0.0.1" and s.api_key is None and s.model is None


def test_command_line_beats_env_beats_file(tmp_path):
    cfg = tmp_path / "parallm.toml"
    cfg.write_text('[server]\nport = 9001\nmax_queue = 5\nhost = "0.0.0.0"\ndrain_timeout = 3.5\n')
    cli, config = cli_values(["--config", str(cfg), "--port", "9003"])
    env = {"PARALLM_PORT": "9002", "PARALLM_MAX_QUEUE": "7", "PARALLM_API_KEY": "k"}
    s = load_settings(cli, config_file=config, environ=env)
    assert s.port == 9003  # command line
    assert s.max_queue == 7 and s.api_key == "k"  # env
    assert s.host == "0.0.0.0" and s.drain_timeout == 3.5  # file
    assert s.max_num_seqs == ServerSettings().max_num_seqs  # default


def test_config_file_from_env_and_top_level_keys(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_num_seqs = 3\n")
    assert load_settings({}, environ={"PARALLM_CONFIG": str(cfg)}).max_num_seqs == 3


@pytest.mark.parametrize("text, needle", [
    ("prot = 1\n", "unknown settings ['prot']"),
    ("port = 'abc'\n", "'port' must be int"),
    ("port = [\n", "not valid TOML"),
    ("port = 70000\n", "port=70000"),
    ("device = 'tpu'\n", "auto, cpu or gpu"),
])
def test_bad_config_files_are_named(tmp_path, text, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings({}, config_file=str(cfg), environ={})
    assert needle in str(e.value)


def test_bad_env_value_is_named():
    with pytest.raises(ConfigError) as e:
        load_settings({}, environ={"PARALLM_MAX_QUEUE": "lots"})
    assert "PARALLM_MAX_QUEUE" in str(e.value)


def test_serve_exits_non_zero_with_a_clear_message_for_a_bad_model(tmp_path):
    missing = tmp_path / "nope"
    r = subprocess.run([sys.executable, "-m", "parallm", "serve", "--model", str(missing), "--port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "cannot load model" in r.stderr and str(missing) in r.stderr


def test_serve_rejects_a_bad_config_file_with_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("nonsense = 1\n")
    r = subprocess.run([sys.executable, "-m", "parallm", "serve", "--config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nonsense" in r.stderr


def test_prefill_wait_steps_reaches_the_engine_only_when_set():
    from parallm.engine.engine import EngineConfig
    from parallm.server.serve_command import engine_config

    cli, config = cli_values(["--prefill-wait-steps", "3"])
    assert engine_config(load_settings(cli, config_file=config, environ={}), EngineConfig).prefill_wait_steps == 3
    env = load_settings(cli_values([])[0], environ={"PARALLM_PREFILL_WAIT_STEPS": "2"})
    assert engine_config(env, EngineConfig).prefill_wait_steps == 2
    unset = load_settings(cli_values([])[0], environ={})
    assert engine_config(unset, EngineConfig).prefill_wait_steps == EngineConfig().prefill_wait_steps
    with pytest.raises(ConfigError):
        load_settings(cli_values(["--prefill-wait-steps", "-1"])[0], environ={})


def test_output_handoff_reaches_the_engine_and_is_checked():
    from parallm.engine.engine import EngineConfig
    from parallm.server.serve_command import engine_config

    cli, config = cli_values(["--output-handoff", "dispatch"])
    assert engine_config(load_settings(cli, config_file=config, environ={}), EngineConfig).output_handoff == "dispatch"
    env = load_settings(cli_values([])[0], environ={"PARALLM_OUTPUT_HANDOFF": "dispatch"})
    assert engine_config(env, EngineConfig).output_handoff == "dispatch"
    assert engine_config(load_settings(cli_values([])[0], environ={}), EngineConfig).output_handoff == "step"
    with pytest.raises(ConfigError, match="output_handoff='soon'"):
        load_settings(cli_values(["--output-handoff", "soon"])[0], environ={})


def test_fuse_projections_flag_reaches_the_engine():
    from parallm.engine.engine import EngineConfig
    from parallm.server.serve_command import engine_config

    from parallm.server.serve_command import cli_settings

    cli = cli_settings(build_parser().parse_args(["serve", "--fuse-projections"]))
    assert engine_config(load_settings(cli, environ={}), EngineConfig).fuse_projections is True
    env = load_settings(cli_values([])[0], environ={"PARALLM_FUSE_PROJECTIONS": "true"})
    assert engine_config(env, EngineConfig).fuse_projections is True
    assert engine_config(load_settings(cli_values([])[0], environ={}), EngineConfig).fuse_projections is False


def test_gil_switch_interval_is_set_only_when_given(tmp_path):
    from parallm.server.runner import set_gil_switch_interval

    cli, _ = cli_values(["--gil-switch-interval-ms", "1.5"])
    assert load_settings(cli, environ={}).gil_switch_interval_ms == 1.5
    env = load_settings(cli_values([])[0], environ={"PARALLM_GIL_SWITCH_INTERVAL_MS": "0.5"})
    assert env.gil_switch_interval_ms == 0.5
    config = tmp_path / "s.toml"
    config.write_text("gil_switch_interval_ms = 2\n")
    assert load_settings(cli_values([])[0], config_file=str(config), environ={}).gil_switch_interval_ms == 2.0
    assert load_settings(cli_values([])[0], environ={}).gil_switch_interval_ms is None
    for bad in ("0", "-1", "5000"):
        with pytest.raises(ConfigError, match="gil_switch_interval_ms"):
            load_settings(cli_values(["--gil-switch-interval-ms", bad])[0], environ={})
    before = sys.getswitchinterval()
    try:
        set_gil_switch_interval(None)  # not given: Python's own interval stays
        assert sys.getswitchinterval() == before
        set_gil_switch_interval(1.5)
        assert sys.getswitchinterval() == pytest.approx(0.0015)
    finally:
        sys.setswitchinterval(before)


def test_event_loop_choice_reaches_uvicorn(monkeypatch):
    import uvicorn

    from parallm.server import runner

    cli, _ = cli_values(["--event-loop", "asyncio"])
    settings = load_settings(cli, environ={})
    assert settings.event_loop == "asyncio"
    assert load_settings(cli_values([])[0], environ={}).event_loop == "auto"
    assert load_settings(cli_values([])[0], environ={"PARALLM_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(ConfigError, match="event_loop='trio'"):
        load_settings(cli_values(["--event-loop", "trio"])[0], environ={})
    seen = {}

    class Capture:  # stands in for the server: records the uvicorn config instead of serving
        engine_failure = None

        def __init__(self, config: uvicorn.Config, app, drain_timeout, exit_on_engine_death=False):
            seen["loop"] = config.loop

        def run(self):
            seen["ran"] = True

    monkeypatch.setattr(runner, "DrainingServer", Capture)
    runner.run_server(object(), "127.0.0.1", 0, 1.0, event_loop=settings.event_loop)
    assert seen == {"loop": "asyncio", "ran": True}


def test_event_loop_uvloop_needs_uvloop(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        ServerSettings(event_loop="uvloop")
