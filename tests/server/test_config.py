"""Settings come from defaults < TOML file < PARALLM_* env < command line; bad values are named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from parallm.cli import build_parser
from parallm.server.config import ConfigError, ServerSettings, load_settings
from parallm.commands.serve import _OPTIONS

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
