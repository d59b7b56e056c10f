"""Dockerfile.macos-runner: no Docker engine runs here, so the image's steps are kept identical to
scripts that do run (the README's setup script, CI's test script, the entrypoint), and these tests
check that the Dockerfile calls exactly those scripts and that the entrypoint behaves."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.macos-runner"
ENTRYPOINT = ROOT / "scripts" / "container-entrypoint.sh"
PROJECT_SCRIPTS = {"scripts/bootstrap.sh", ".ci/run", "scripts/container-entrypoint.sh"}
# RUN steps that are not project scripts must not install or configure anything that a project
# script should do; these are the only other commands allowed.
ALLOWED_OTHER_COMMANDS = {"useradd", "touch"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def scripts_named(text: str) -> set[str]:
    found = set(re.findall(r"(?:^|[\s\"/])((?:scripts/[\w.-]+\.sh)|(?:\.ci/run))\b", text))
    return found


def test_dockerfile_steps_are_exactly_the_project_scripts():
    steps = instructions(DOCKERFILE)
    runs = [args for kind, args in steps if kind == "RUN"]
    entry = [args for kind, args in steps if kind in ("ENTRYPOINT", "CMD")]
    referenced = set().union(*(scripts_named(a) for a in runs + entry))
    assert referenced == PROJECT_SCRIPTS
    for script in PROJECT_SCRIPTS:
        assert (ROOT / script).is_file(), script
    # Every RUN is a chain of project scripts and allowed bookkeeping commands, nothing else:
    # no pip, apt-get or uv line that the scripts (and so the tests and CI) would not also run.
    for run in runs:
        for command in re.split(r"&&|;", run):
            words = command.split()
            if words[:1] == ["bash"] and len(words) == 2 and words[1] in PROJECT_SCRIPTS:
                continue
            assert words and words[0] in ALLOWED_OTHER_COMMANDS, f"RUN step not from a project script: {command!r}"
    assert "bash scripts/bootstrap.sh" in runs
    assert any(r.startswith("bash .ci/run") for r in runs)
    assert entry[0] == '["/opt/parallm/scripts/container-entrypoint.sh"]'
    assert entry[1] == '["serve"]'


def test_the_scripts_are_the_readme_and_ci_steps():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/bootstrap.sh && .venv/bin/python -m pytest -q" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/bootstrap.sh && .venv/bin/python -m pytest -q" in ci


def test_build_argument_selects_extras_read_by_bootstrap():
    steps = instructions(DOCKERFILE)
    args = [a for kind, a in steps if kind == "ARG"]
    envs = " ".join(a for kind, a in steps if kind == "ENV")
    assert any(a.startswith("PARALLM_EXTRAS=") for a in args)
    assert "PARALLM_EXTRAS=${PARALLM_EXTRAS}" in envs
    assert "PARALLM_EXTRAS" in (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert 'cuda = ["mlx[cuda13]' in (ROOT / "pyproject.toml").read_text()  # the extra exists
    froms = [a for kind, a in steps if kind == "FROM"]
    assert froms[0].endswith("AS base") and any(f.endswith("AS test") for f in froms)
    assert "python:3.11-slim-bookworm" in DOCKERFILE.read_text()


def test_runtime_stage_depends_on_tests_and_is_not_root():
    steps = instructions(DOCKERFILE)
    runtime = steps[[i for i, (k, a) in enumerate(steps) if k == "FROM" and a.endswith("AS runtime")][0]:]
    assert ("COPY", "--from=test /opt/parallm/.tests-passed /opt/parallm/.tests-passed") in runtime
    assert ("USER", "parallm") in runtime
    assert ("ENV", "PARALLM_IN_CONTAINER=1") in runtime


def test_dockerignore_keeps_local_environments_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".tools", ".git"} <= set(ignored)


@pytest.mark.parametrize("script", sorted(PROJECT_SCRIPTS))
def test_scripts_parse(script):
    shell = "sh" if script.endswith("entrypoint.sh") else "bash"
    done = subprocess.run([shell, "-n", str(ROOT / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PARALLM_")}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env={**base, "PARALLM_APP_DIR": "/opt/parallm", **env}, timeout=30)


def test_entrypoint_refuses_to_serve_without_a_key():
    for env in ({}, {"PARALLM_API_KEY": ""}, {"PARALLM_API_KEY": "  \t"}):
        done = entrypoint(PARALLM_ENTRYPOINT_DRY_RUN="1", PARALLM_IN_CONTAINER="1", **env)
        assert done.returncode == 78, done
        assert "PARALLM_API_KEY is not set" in done.stderr and done.stdout == ""
        explicit = entrypoint("serve", "--port", "9000", PARALLM_ENTRYPOINT_DRY_RUN="1", **env)
        assert explicit.returncode == 78


def test_entrypoint_serves_on_all_interfaces_only_in_the_container():
    done = entrypoint(PARALLM_ENTRYPOINT_DRY_RUN="1", PARALLM_IN_CONTAINER="1", PARALLM_API_KEY="k" * 24)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["/opt/parallm/.venv/bin/parallm", "serve", "--host", "0.0.0.0"]
    assert "k" * 24 not in done.stdout  # the key travels in the environment, not argv
    outside = entrypoint("serve", "--model", "a b", PARALLM_ENTRYPOINT_DRY_RUN="1", PARALLM_API_KEY="secret")
    assert outside.stdout.splitlines() == ["/opt/parallm/.venv/bin/parallm", "serve", "--host", "127.0.0.1",
                                           "--model", "a b"]


def test_entrypoint_runs_other_commands_without_a_key():
    done = entrypoint("info", "--model", "x", PARALLM_ENTRYPOINT_DRY_RUN="1")
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["/opt/parallm/.venv/bin/parallm", "info", "--model", "x"]


def test_entrypoint_execs_parallm_with_the_environment(tmp_path):
    """Not a dry run: a stand-in `parallm` records its argv and the key it was given."""
    fake = tmp_path / ".venv" / "bin" / "parallm"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\nprintf "%s|" "$@"\necho "key=$PARALLM_API_KEY"\n')
    fake.chmod(0o755)
    done = entrypoint(PARALLM_APP_DIR=str(tmp_path), PARALLM_IN_CONTAINER="1", PARALLM_API_KEY="the-key")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "serve|--host|0.0.0.0|key=the-key"


def test_entrypoint_is_executable_in_git():
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    if shutil.which("git") and (ROOT / ".git").exists():
        mode = subprocess.run(["git", "ls-files", "-s", str(ENTRYPOINT.relative_to(ROOT))], cwd=ROOT,
                              capture_output=True, text=True).stdout.split()[:1]
        if mode:  # tracked
            assert mode == ["100755"]
