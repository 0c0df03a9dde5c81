"""camcore: the class-activation-map family (CAM, Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM,
Eigen-CAM, ...) with one framework-free Array-API core and thin backends for each deep-learning framework.

``camcore.explain(model, inputs, method="gradcam", layer="layer4")`` is the one call most users need; the
formulas (:mod:`camcore.weights`) and post-processing (:mod:`camcore.maps`) are public pure functions.
Importing camcore imports no deep-learning framework.
"""
from . import maps, targets, weights
from .explain import Explainer, explain
from .methods import METHODS
from .tokens import tokens_to_grid

__version__ = "0.1.0"
__all__ = ["explain", "Explainer", "METHODS", "tokens_to_grid", "maps", "targets", "weights", "__version__"]
# the other public modules, imported on first use (``camcore.consistency.compare(...)`` after ``import camcore``)
_LAZY = ("consistency", "metrics", "viz", "report", "loaders", "perturbation", "ports", "demo", "cli")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'camcore' has no attribute {name!r}")
