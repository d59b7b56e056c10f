"""The house checks itself, by parsing imports and counting lines:
- dependencies point down only: commands -> server -> engine -> models (finetune beside engine);
- the scheduler imports no mlx (it is books only, testable without a device);
- server/ reaches the engine only through the client protocol and the boundary types;
- no module is over the line limit, and no two modules share a name."""
import ast
from collections import Counter
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "parallm"
LINE_LIMIT = 400  # "each module is one noun": past this, a second noun is usually hiding in it
WEB = ["fastapi", "starlette", "pydantic", "sse_starlette", "uvicorn"]

# layer -> top-level modules it must never import
FORBIDDEN = {
    "models": ["parallm.engine", "parallm.server", "parallm.finetune", "parallm.commands", *WEB],
    "engine": ["parallm.server", "parallm.finetune", "parallm.commands", *WEB],
    "finetune": ["parallm.server", "parallm.commands", *WEB],
    "server": ["parallm.commands"],
}
# what server/ may import of the engine: the client protocol and the boundary types
SERVER_MAY_USE = ("parallm.engine.client", "parallm.engine.types", "parallm.engine.errors")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downward(layer):
    files = sorted((PKG / layer).rglob("*.py"))
    assert files, f"no files in parallm/{layer}"
    bad = [f"{f.relative_to(PKG)} imports {name}" for f in files for name in imported_modules(f)
           if any(_is(name, b) for b in FORBIDDEN[layer])]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_scheduler_imports_no_mlx():
    names = imported_modules(PKG / "engine" / "scheduler.py")
    assert not [n for n in names if _is(n, "mlx")], names


def test_server_reaches_the_engine_only_through_the_client():
    bad = [f"{f.relative_to(PKG)} imports {name}" for f in sorted((PKG / "server").rglob("*.py"))
           for name in imported_modules(f)
           if _is(name, "parallm.engine") and not any(_is(name, ok) for ok in SERVER_MAY_USE)]
    assert not bad, "server/ past the engine client:\n" + "\n".join(bad)


def test_no_module_is_over_the_line_limit():
    long = [f"{f.relative_to(PKG)}: {n} lines" for f in sorted(PKG.rglob("*.py"))
            if (n := len(f.read_text().splitlines())) > LINE_LIMIT]
    assert not long, "\n".join(long)


def test_no_two_modules_share_a_name():
    names = Counter(f.name for f in PKG.rglob("*.py") if f.name != "__init__.py")
    assert not [n for n, count in names.items() if count > 1], names.most_common(3)


def test_checker_sees_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from parallm.server import app\nimport fastapi\n")
    assert imported_modules(f) == ["parallm.server", "fastapi"]
