"""The registry of methods that :func:`camcore.explain` accepts, and what each needs from a backend."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from . import maps
from . import weights as W

__all__ = ["Method", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """One CAM method: how to weigh the activations and how to reduce the weighted channels.

    ``weights(A, G, **hyper) -> (B, C) | (B, C, *S) | None`` (``None``: the activations unweighted);
    ``eigen``: reduce by the first principal component instead of the channel sum;
    ``orient(A, G) -> (B, *S)``: the map that principal component is oriented to agree with (with ``eigen`` or
    ``eigen_smooth``); ``None``: the method's own channel-sum map, or, for unweighted activations (Eigen-CAM), their
    energy (see :func:`camcore.maps.principal_component`);
    ``needs_grads``: whether the backend must compute ``dy/dA``; ``hyper``: keyword options and defaults;
    ``perturbation``: for gradient-free methods, where the masks go, ``"input"`` (Score-CAM family, the weights
    from :func:`camcore.perturbation.score_weights`) or ``"layer"`` (Ablation-CAM).
    """

    name: str
    weights: Callable | None
    needs_grads: bool = True
    eigen: bool = False
    orient: Callable | None = None
    hyper: dict = field(default_factory=dict)
    perturbation: str | None = None


def _gradcam_map(a, g):
    """Grad-CAM's map ``sum_k mean(G_k) A_k`` (before its ReLU), ``(B, *S)``: EigenGrad-CAM's orientation."""
    return maps.channel_sum(maps.weigh(W.gradcam(a, g), a))


_MASKED = {"batch_size": 32, "progress": None}  # options of every gradient-free method
_SCORE = {**_MASKED, "weighting": "probability", "top_k": None}

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("cam", None, needs_grads=False),  # weights from the classifier; see camcore.explain
        Method("gradcam", W.gradcam),
        Method("gradcam++", W.gradcam_pp, hyper={"eps": 0.0}),
        Method("xgradcam", W.xgradcam, hyper={"eps": 0.0}),
        Method("hirescam", W.hirescam),
        Method("gradcam-elementwise", W.gradcam_elementwise),
        Method("layercam", W.layercam),
        Method("eigencam", None, needs_grads=False, eigen=True),
        Method("eigengradcam", W.eigengradcam, eigen=True, orient=_gradcam_map),
        Method("scorecam", None, needs_grads=False, perturbation="input", hyper={**_SCORE}),
        Method("sscam", None, needs_grads=False, perturbation="input",
               hyper={**_SCORE, "num_samples": 10, "std": 2.0, "seed": 0}),
        Method("iscam", None, needs_grads=False, perturbation="input", hyper={**_SCORE, "num_samples": 10}),
        Method("ablationcam", None, needs_grads=False, perturbation="layer", hyper={**_MASKED}),
    ]
}


def get_method(name) -> Method:
    """The registered method called ``name`` (case-insensitive); ``ValueError`` listing the close names."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key in METHODS:
        return METHODS[key]
    close = difflib.get_close_matches(str(key), METHODS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"method: unknown method {name!r}; expected one of {', '.join(METHODS)}.{hint}")
