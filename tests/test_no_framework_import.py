"""Importing camcore (and using its core on NumPy arrays) imports no deep-learning or plotting framework."""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

FRAMEWORKS = ["torch", "tensorflow", "jax", "keras", "flax", "matplotlib", "cv2"]

_PROBE = r"""
import json, sys
import camcore
import camcore.weights, camcore.maps, camcore.targets, camcore.tokens, camcore.backends, camcore.metrics, camcore.consistency
import camcore.viz, camcore.report, camcore.loaders, camcore.cli, camcore.demo
after_import = sorted({m.split('.')[0] for m in sys.modules} & set(FRAMEWORKS))
if USE_CORE:
    import numpy as np
    from camcore import maps, targets, tokens_to_grid, weights
    rng = np.random.default_rng(0)
    a, g = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    for f in (weights.gradcam, weights.gradcam_pp, weights.xgradcam, weights.layercam, weights.hirescam,
              weights.gradcam_elementwise, weights.eigengradcam):
        w = f(a, g)
    m = maps.normalize(maps.upsample(maps.relu(maps.channel_sum(maps.weigh(weights.gradcam(a, g), a))), (8, 10)))
    p = maps.principal_component(a)
    maps.fuse([m, m])
    weights.cam(rng.normal(size=(4, 3)), np.array([0, 3]))
    targets.target_scores(targets.check_targets([1, 2], 2), rng.normal(size=(2, 5)), 2)
    tokens_to_grid(rng.normal(size=(2, 10, 3)))
    from camcore import metrics
    boxes = metrics.boxes_from_cam(m)
    metrics.localisation_accuracy(m, boxes), metrics.pointing_game(m, boxes), metrics.energy_pointing_game(m, boxes)
after_use = sorted({m.split('.')[0] for m in sys.modules} & set(FRAMEWORKS))
print(json.dumps({"after_import": after_import, "after_use": after_use}))
"""


def _run_probe(use_core: bool) -> dict:
    code = f"FRAMEWORKS = {FRAMEWORKS!r}\nUSE_CORE = {use_core!r}\n" + _PROBE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_camcore_imports_no_framework():
    out = _run_probe(use_core=False)
    assert out["after_import"] == [], f"importing camcore pulled in {out['after_import']}"


def test_numpy_use_of_the_core_imports_no_framework():
    out = _run_probe(use_core=True)
    assert out["after_import"] == []
    assert out["after_use"] == [], f"using the core on NumPy arrays pulled in {out['after_use']}"


# ------------------------------------------------------------------------------------------- static check
_STATIC_FORBIDDEN = {"torch", "tensorflow", "jax"}
_LAZY_FILES = {"demo.py", "viz.py"}  # import frameworks inside functions only


def _package_dirs() -> list[pathlib.Path]:
    import camcore
    import camcore.backends

    return [pathlib.Path(camcore.__file__).parent, pathlib.Path(camcore.backends.__file__).parent]


def _top_level_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Module names imported when the module is executed: everything outside function bodies (module body,
    if/try/with blocks, class bodies)."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.lineno, child.module))
            visit(child)

    visit(tree)
    return found


def _core_files() -> list[pathlib.Path]:
    camcore_dir, backends_dir = _package_dirs()
    files = [p for p in sorted(camcore_dir.rglob("*.py")) if p.name not in _LAZY_FILES]
    # camcore.backends' own __init__ is imported by camcore users too; its framework modules (pytorch.py, ...)
    # are imported only once a model of that framework is passed.
    files.append(backends_dir / "__init__.py")
    return files


def test_core_files_found():
    names = {p.name for p in _core_files()}
    assert {"weights.py", "maps.py", "targets.py", "tokens.py", "_xp.py", "explain.py", "__init__.py"} <= names


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_top_level_framework_import(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [(line, mod) for line, mod in _top_level_imports(tree)
           if mod.split(".")[0] in _STATIC_FORBIDDEN | set(FRAMEWORKS)]
    assert not bad, f"{path}: top-level framework import(s) {bad}"


@pytest.mark.parametrize("name", sorted(_LAZY_FILES))
def test_demo_and_viz_import_frameworks_lazily(name):
    path = _package_dirs()[0] / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [(line, mod) for line, mod in _top_level_imports(tree) if mod.split(".")[0] in _STATIC_FORBIDDEN]
    assert not bad, f"{path}: top-level framework import(s) {bad}"


def test_static_checker_detects_top_level_imports():
    """The AST walk itself: a top-level or if-guarded import is caught, an import inside a function is not."""
    src = "import os\nif True:\n    import torch.nn\nclass K:\n    from jax import numpy\n" \
          "def f():\n    import tensorflow\n"
    mods = [m for _, m in _top_level_imports(ast.parse(src))]
    assert mods == ["os", "torch.nn", "jax"]
