"""Backend adapters, installed as ``camcore.backends``: one module per framework, chosen from the model's type.

Every adapter exposes the same contract (see ``docs/adapters.md``):

- ``activations_and_grads(inputs, layers, targets=None, *, gradients=True) -> (outputs, activations, grads)``
- ``forward_masked(inputs, masks, *, at="input", targets=None, batch_size=32) -> scores (B, M)``

A framework module is looked up in ``sys.modules`` only: camcore never imports a framework the user did not.
"""
from __future__ import annotations

import difflib
import sys

__all__ = ["adapter_for", "unknown_layer"]


def adapter_for(model, **options):
    """The adapter for ``model``, picked by its type (a ``torch.nn.Module`` -> PyTorch adapter)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        from .pytorch import TorchAdapter

        return TorchAdapter(model, **options)
    raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")


def unknown_layer(layer, names) -> ValueError:
    """The error for a layer name that does not exist, listing the closest real names."""
    names = list(names)
    close = difflib.get_close_matches(str(layer), names, n=5, cutoff=0.4)
    if not close:  # fall back to names sharing the last path component, then to the last few layers
        tail = str(layer).rsplit(".", 1)[-1]
        close = [n for n in names if n.rsplit(".", 1)[-1] == tail][:5] or names[-5:]
    return ValueError(f"layer: no layer named {layer!r} in the model; closest real names: "
                      f"{', '.join(map(repr, close))}")
