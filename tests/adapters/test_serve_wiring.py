"""`parallm serve` settings for adapters: --adapter NAME=PATH (repeatable) and --adapters-dir build
an engine whose manager serves the startup adapters and whose app has the adapter routes."""
from __future__ import annotations

import argparse

import pytest

from parallm.engine.adapter_manager import AdapterLoadFailed
from parallm.server.config import ConfigError, ServerSettings, load_settings
from parallm.commands.serve import adapter_specs, add_arguments, build_engine


def test_cli_adapter_flags_reach_settings(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--adapter", "a=/x/a", "--adapter", "b=/x/b", "--adapters-dir", str(tmp_path)])
    assert args.adapters == ["a=/x/a", "b=/x/b"]
    settings = load_settings({"adapters": ",".join(args.adapters), "adapters_dir": args.adapters_dir}, environ={})
    assert [(s.name, s.path) for s in adapter_specs(settings)] == [("a", "/x/a"), ("b", "/x/b")]
    with pytest.raises(ConfigError, match="NAME=PATH"):
        adapter_specs(ServerSettings(adapters="no-equals-sign"))
    env = load_settings({}, environ={"PARALLM_ADAPTERS": "c=/y", "PARALLM_ADAPTERS_DIR": "/ad"})
    assert env.adapters == "c=/y" and env.adapters_dir == "/ad"


def test_build_engine_serves_startup_adapters(tiny_model_dir, make_adapter, tmp_path):
    d = make_adapter("x", seed=1)
    settings = ServerSettings(model=str(tiny_model_dir), served_model_name="tiny", device="cpu",
                              adapters=f"sql={d}", adapters_dir=str(tmp_path / "adapters"))
    engine = build_engine(settings)
    assert engine.adapter_parent("sql") == "tiny" and engine.adapter_parent("tiny") is None
    assert [a.name for a in engine.adapters()] == ["sql"]
    assert [c["id"] for c in engine.model_cards()] == ["tiny", "sql"]


def test_bad_startup_adapter_is_a_typed_error(tiny_model_dir, tmp_path):
    settings = ServerSettings(model=str(tiny_model_dir), device="cpu", adapters=f"sql={tmp_path / 'missing'}")
    with pytest.raises(AdapterLoadFailed, match="does not exist"):
        build_engine(settings)
