"""Backend adapters, installed as ``camcore.backends``: one module per framework, chosen from the model's type.

Every adapter exposes the same contract (see ``docs/adapters.md``):

- ``activations_and_grads(inputs, layers, targets=None, *, gradients=True) -> (outputs, activations, grads)``
- ``forward_masked(inputs, masks, *, at="input", targets=None, batch_size=32, probability=False, progress=None,
  info=None) -> scores (B, M)``

both built by the shared :class:`~camcore.backends.engine.Engine` from a few primitives per framework.

A framework module is looked up in ``sys.modules`` only: camcore never imports a framework the user did not.
Adapters hand the core channels-first arrays ``(B, C, *S)`` and transpose channels-last models at their edge.
"""
from __future__ import annotations

import difflib
import importlib
import re
import sys
import warnings

__all__ = ["adapter_for", "BACKENDS", "unknown_layer", "check_data_format", "check_masks", "check_batch_size",
           "camcore_error", "model_error", "fell_back", "MODEL_KINDS"]

MODEL_KINDS = ("a torch.nn.Module, a Keras 3 model, a Flax linen (module, variables) pair, a Flax nnx module, "
               "or a (features, head) pair of JAX functions")
DATA_FORMATS = ("channels_last", "channels_first")


# (framework module, backend module, adapter class, accepts(model, framework) or None: the module's ``accepts``)
BACKENDS = [
    ("torch", "pytorch", "TorchAdapter", lambda model, torch: isinstance(model, torch.nn.Module)),
    ("keras", "keras", "KerasAdapter", lambda model, keras: isinstance(model, keras.layers.Layer)),
    ("jax", "jax", "JaxAdapter", None),
]


def adapter_for(model, **options):
    """The adapter for ``model``, picked by its type from :data:`BACKENDS` among the frameworks already imported;
    ``options`` (``model_mode``, ``data_format``, ``compile``) go to it."""
    for framework, name, cls, accepts in BACKENDS:
        fw = sys.modules.get(framework)
        if fw is None or (accepts is not None and not accepts(model, fw)):
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        if accepts is not None or module.accepts(model):
            return getattr(module, cls)(model, **options)
    raise TypeError(f"model: expected {MODEL_KINDS}; got {type(model).__module__}.{type(model).__name__}")


def check_data_format(data_format, default: str) -> bool:
    """``True`` when the layout is channels-last: ``data_format`` if given, else ``default``."""
    if data_format is None:
        data_format = default
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format: expected one of {DATA_FORMATS} or None, got {data_format!r}")
    return data_format == "channels_last"


def camcore_error(err: Exception) -> Exception:
    """Mark ``err`` as raised by camcore itself (e.g. in a hook, inside the model's forward pass), so that
    :func:`model_error` passes it on unchanged."""
    err._camcore = True
    return err


def model_error(err: Exception, shape, channels_last: bool, hint: str = "") -> Exception:
    """The error to raise, ``from err``, when the model's forward pass on inputs of ``shape`` raised ``err``: the
    same type (``RuntimeError`` if that type cannot take a message) with the inputs' shape, the layout camcore
    passed them in, and a hint: ``hint`` (the backend's: a dtype or device that differs from the model's), or
    where the last dimension looks like channels (1, 3 or 4) and the second does not, to permute them or to pass
    ``data_format``. camcore's own errors (:func:`camcore_error`, or raised in camcore's code) come back as they
    are."""
    if getattr(err, "_camcore", False) or _raised_in_camcore(err):
        return err
    shape = tuple(shape)
    layout = "(B, *spatial, C)" if channels_last else "(B, C, *spatial)"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split("Arguments received by")[0]  # Keras' colours, echo
    first = " ".join(line.strip() for line in text.splitlines() if line.strip())
    msg = (f"model: the forward pass of inputs of shape {shape} raised {type(err).__name__}: {first}; camcore "
           f"passes the inputs to the model as given, one batch {layout} (one example needs its batch axis: "
           f"x[None])")
    looks_last = len(shape) >= 3 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4)
    if hint:
        msg += f"; {hint}"
    elif looks_last and not channels_last:
        perm = ", ".join(map(str, (0, len(shape) - 1, *range(1, len(shape) - 1))))
        msg += (f"; the inputs look channels-last (B, *spatial, C) but were given as channels-first "
                f"(B, C, *spatial): permute them (x.permute({perm})) for a channels-first model, or pass "
                f"data_format='channels_last' if the model takes channels-last inputs")
    try:
        new = type(err)(msg)
    except Exception:  # an exception type whose constructor takes other arguments
        new = RuntimeError(msg)
    return camcore_error(new)


def _raised_in_camcore(err: Exception) -> bool:
    """Whether ``err`` was raised by camcore's own code (its innermost frame is in ``camcore/`` or ``backends/``,
    e.g. a check in a hook), not by the model or its framework."""
    import os

    import camcore

    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    core = os.path.dirname(os.path.abspath(camcore.__file__))
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return any(path.startswith(d + os.sep) for d in (here, core))


def unknown_layer(layer, names) -> ValueError:
    """The error for a layer name that does not exist, listing the closest real names."""
    names = list(names)
    close = difflib.get_close_matches(str(layer), names, n=5, cutoff=0.4)
    if not close:  # fall back to names sharing the last path component, then to the last few layers
        tail = str(layer).rsplit(".", 1)[-1]
        close = [n for n in names if n.rsplit(".", 1)[-1] == tail][:5] or names[-5:]
    return ValueError(f"layer: no layer named {layer!r} in the model; closest real names: "
                      f"{', '.join(map(repr, close))}")


def check_masks(mask_shape, batch: int, at_shape, at) -> bool:
    """Check ``forward_masked``'s masks against the channels-first shape ``at_shape`` (``(B, C, *S)``) of the
    tensor they multiply; ``True`` when they are per sample ``(B, M, *shape)``, ``False`` when shared."""
    rank = len(at_shape) - 1  # rank of one sample at `at`
    mask_shape = tuple(mask_shape)
    if len(mask_shape) not in (rank + 1, rank + 2) or (len(mask_shape) == rank + 2 and mask_shape[0] != batch):
        raise ValueError(f"masks: expected (M, *shape) or ({batch}, M, *shape) with shape broadcasting against "
                         f"one sample {tuple(at_shape[1:])} at {at!r}; got shape {mask_shape}")
    per_sample = len(mask_shape) == rank + 2
    shape, sample = mask_shape[2 if per_sample else 1:], tuple(at_shape[1:])
    if any(m not in (1, s) for m, s in zip(shape, sample)):
        raise ValueError(f"masks: shape {shape} of each mask does not broadcast against one sample {sample} at "
                         f"{at!r} (each size must be 1 or equal); got masks of shape {mask_shape}")
    return per_sample


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")


def fell_back(info: dict, instead: str, reason: str, stacklevel: int) -> None:
    """Record ``info["reason"]`` and warn that ``forward_masked`` ran the whole model eagerly for every chunk of
    masks (the ``"full"`` path: slower, same scores) instead of its fast path ``instead``, because of ``reason``.
    ``stacklevel`` counts from the caller of this function, as for ``warnings.warn``."""
    info["reason"] = reason
    warnings.warn(f"forward_masked: ran the whole model eagerly for every chunk of masks (the \"full\" path: slower, "
                  f"same scores) instead of {instead}; {reason}", RuntimeWarning, stacklevel=stacklevel + 1)
