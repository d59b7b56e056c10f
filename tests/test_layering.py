"""Dependencies point down only: server -> engine -> models. Checked by parsing imports."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "parallm"

# layer -> top-level modules it must never import
FORBIDDEN = {
    "models": ["parallm.engine", "parallm.server", "fastapi", "starlette", "pydantic", "sse_starlette"],
    "engine": ["parallm.server", "fastapi", "starlette", "pydantic", "sse_starlette"],
}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downward(layer):
    files = sorted((PKG / layer).rglob("*.py"))
    assert files, f"no files in parallm/{layer}"
    bad = []
    for f in files:
        for name in imported_modules(f):
            if any(name == b or name.startswith(b + ".") for b in FORBIDDEN[layer]):
                bad.append(f"{f.relative_to(PKG)} imports {name}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_checker_sees_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from parallm.server import app\nimport fastapi\n")
    assert imported_modules(f) == ["parallm.server", "fastapi"]
