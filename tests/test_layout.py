"""The package stays readable: no module over 400 lines, no import inside a function that hides an intra-package
cycle, and the README's layout names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "trl_opd").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(ROOT)))
def test_module_is_small_and_imports_at_top_level(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 400, f"{path.name} has grown past 400 lines: split it by job"
    tree = ast.parse(source)
    top_level = set(map(id, tree.body))
    lazy = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.level > 0 or (node.module or "").startswith("trl_opd"))
        and id(node) not in top_level
    ]
    assert not lazy, f"{path.name} imports trl-opd modules inside functions (lines {lazy}): an import cycle?"


def test_readme_layout_lists_every_module():
    layout = re.search(r"## Layout\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    listed = {line.split()[0] for line in layout.splitlines() if line.strip()}
    modules = {str(path.relative_to(ROOT)) for path in MODULES if path.parent.name != "callbacks"}
    modules = {module for module in modules if not module.endswith("__init__.py")}
    assert modules <= listed, f"README's layout misses {sorted(modules - listed)}"
    assert "trl_opd/callbacks/" in listed
