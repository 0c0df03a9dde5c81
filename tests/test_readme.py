"""The README is what a new user runs first: every Python block stands on its own (each name it uses is defined
or imported in that block), and every install extra of pyproject.toml is named there."""
from __future__ import annotations

import ast
import builtins
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def undefined_names(source: str) -> set[str]:
    """Names a block loads that it neither assigns, imports nor takes as a parameter (nor are builtins)."""
    tree = ast.parse(source)
    defined, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name):
            (defined if isinstance(node.ctx, ast.Store) else used).add(node.id)
    return used - defined


def test_the_checker_sees_a_missing_name():
    assert undefined_names("import numpy as np\ny = np.stack([x])\nf = lambda v: v + y") == {"x"}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_python_block_is_self_contained(index):
    assert undefined_names(BLOCKS[index]) == set(), BLOCKS[index]


def test_every_extra_is_named():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras and all(f"camcore[{name}]" in README for name in extras), sorted(extras)


def test_every_method_is_listed_where_users_read_the_list():
    """The method list is written by hand in the README, docs/methods.md and explain's docstring: each must name
    every registered method (and the registry is what explain accepts)."""
    import camcore

    methods_doc = (ROOT / "docs" / "methods.md").read_text()
    for name in camcore.METHODS:
        assert f'"{name}"' in README, name
        assert f"| `{name}`" in methods_doc, name
        assert f'``"{name}"``' in camcore.explain.__doc__, name
