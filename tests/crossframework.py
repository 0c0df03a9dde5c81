"""Cross-framework consistency: one real model on several frameworks must give the same maps.

A *port* is the same network on another framework with the same weights (``camcore.ports``). Each port
knows how to lay out the inputs for its framework and how its framework names a layer of the PyTorch original.
``explain_everywhere`` runs one ``camcore.explain`` call on every port and returns the maps as NumPy arrays, so a
test compares any framework with any other. New frameworks or new ported models only add a :class:`Port`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Port:
    """The same model on one framework.

    Attributes:
        framework: a short name (``"torch"``, ``"keras"``, ``"flax"``).
        model: what ``camcore.explain`` takes for that framework.
        inputs: ``(B, C, H, W)`` NumPy photos -> the framework's inputs.
        layer: the PyTorch module path -> the framework's name for the same layer.
        logits: the framework's inputs -> ``(B, K)`` NumPy logits.
    """

    framework: str
    model: object
    inputs: Callable
    layer: Callable[[str], str]
    logits: Callable


def torch_port(model) -> Port:
    import torch

    def logits(x):
        with torch.no_grad():
            return model(x).numpy()

    return Port("torch", model, lambda x: torch.from_numpy(np.ascontiguousarray(x)), lambda n: n, logits)


def keras_port(torch_model) -> Port:
    from camcore.ports import keras_efficientnet_lite

    model = keras_efficientnet_lite(torch_model)
    return Port("keras", model, _channels_last, lambda n: n,
                lambda x: np.asarray(model(x, training=False)))


def flax_port(torch_model) -> Port:
    import jax
    import jax.numpy as jnp

    from camcore.ports import flax_efficientnet_lite, flax_path

    module, variables = flax_efficientnet_lite(torch_model)
    apply = jax.jit(module.apply)
    return Port("flax", (module, variables), lambda x: jnp.asarray(_channels_last(x)), flax_path,
                lambda x: np.asarray(apply(variables, x)))


def _channels_last(x):
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1))


def explain_on(port: Port, photos, *, layer, **kwargs):
    """``camcore.explain`` on one port; ``layer`` is the PyTorch name (or a list of them). NumPy ``(B, H, W)``, or
    ``{method: maps}`` for a list of methods."""
    import camcore

    layers = [port.layer(n) for n in layer] if isinstance(layer, (list, tuple)) else port.layer(layer)
    got = camcore.explain(port.model, port.inputs(photos), layer=layers, **kwargs)
    return {k: np.asarray(v) for k, v in got.items()} if isinstance(got, dict) else np.asarray(got)


def explain_everywhere(ports, photos, *, infos: dict | None = None, **kwargs) -> dict[str, np.ndarray]:
    """The same ``camcore.explain`` call on every port: ``{framework: maps}``; ``infos`` given, each framework's
    ``info=`` dict (how a gradient-free method ran) lands in ``infos[framework]``."""
    maps = {}
    for p in ports:
        info = {} if infos is None else {"info": infos.setdefault(p.framework, {})}
        maps[p.framework] = explain_on(p, photos, **kwargs, **info)
    return maps


def max_map_difference(maps: dict[str, np.ndarray], reference: str = "torch") -> dict[str, float]:
    """Max abs difference of each framework's maps from the reference framework's."""
    ref = maps[reference]
    return {k: float(np.max(np.abs(v - ref))) for k, v in maps.items() if k != reference}
