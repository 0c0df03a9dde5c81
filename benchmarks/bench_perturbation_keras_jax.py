"""Gradient-free methods on the pretrained EfficientNet-Lite0 ported to Keras 3 and Flax: camcore vs tf-keras-vis.

    python benchmarks/bench_perturbation_keras_jax.py [--frameworks keras,jax] [--batch-size 32] [--repeats 3]

One photo (the cat), layer ``_conv_head`` (1280 channels, the last conv), top class, ``batch_size`` masked copies
per forward pass everywhere, side by side in one process:

- Keras: camcore Score-CAM vs tf-keras-vis ``Scorecam`` (its Score-CAM weighs by the target's softmax probability,
  as camcore's default does; ``tests/test_parity_tf_keras_vis.py``), camcore Ablation-CAM (tf-keras-vis has
  none), and the *floor*: 1280 plain forward passes of the model at the same batch size, in a ``tf.function``;
- JAX (Flax linen ``(module, variables)``): camcore Score-CAM and Ablation-CAM, and the floor in ``jax.jit``.

Wall times: median of ``--repeats`` runs in alternating order, after one warm-up run of each (which compiles the
graphs). Peak memory: as in the other benchmarks, one child process holding all runners, fixed glibc mmap
threshold, VmHWM reset before each run (``memprobe.py``); one measured run per runner.
"""
from __future__ import annotations

import argparse
import os
import statistics
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import torchvision  # noqa: E402,F401  (before any TensorFlow import, see docs/adapters.md)
from memprobe import add_child_arguments, cpu_memory, fresh_child, measure, memory_child  # noqa: E402

LAYER = "_conv_head"


def setup():
    """The pretrained torch model and the cat photo, channels-last ``(1, 224, 224, 3)`` float32."""
    from camcore.demo import MEAN, STD, load_model, load_photo

    return load_model(), ((load_photo("chelsea")[None] - MEAN) / STD).astype(np.float32)


def _camcore_runs(prefix, model, x, batch_size, results, infos):
    import camcore

    def run(method, key):
        def go():
            info = {}
            results[key] = np.asarray(camcore.explain(model, x, method=method, layer=LAYER, batch_size=batch_size,
                                                      progress=False, info=info))
            infos[key] = info
        return go

    return {f"{prefix} camcore ablation": run("ablationcam", f"{prefix} camcore ablation"),
            f"{prefix} camcore score": run("scorecam", f"{prefix} camcore score")}


def _floor(forward, x, batch_size, channels=1280):
    """The forward passes Score-CAM needs at least: one per channel, ``batch_size`` at a time."""
    chunk = np.repeat(x, batch_size, axis=0)

    def go():
        for start in range(0, channels, batch_size):
            np.asarray(forward(chunk[: min(batch_size, channels - start)]))
    return go


def keras_runners(torch_model, x, batch_size, results, infos):
    import keras
    import tensorflow as tf
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.scores import CategoricalScore

    from camcore.ports import keras_efficientnet_lite

    keras.utils.disable_interactive_logging()  # tf-keras-vis calls model.predict, which draws a progress bar
    kmodel = keras_efficientnet_lite(torch_model)
    top = int(np.asarray(kmodel(x, training=False)).argmax())
    tkv = Scorecam(kmodel, model_modifier=None, clone=False)

    def tkv_run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results["keras tkv score"] = np.asarray(tkv(CategoricalScore([top]), x, penultimate_layer=LAYER,
                                                        seek_penultimate_conv_layer=False, batch_size=batch_size))

    forward = tf.function(lambda b: kmodel(b, training=False))
    return {**_camcore_runs("keras", kmodel, x, batch_size, results, infos), "keras tkv score": tkv_run,
            "keras floor": _floor(forward, x, batch_size)}


def jax_runners(torch_model, x, batch_size, results, infos):
    import jax

    from camcore.ports import flax_efficientnet_lite

    module, variables = flax_efficientnet_lite(torch_model)
    forward = jax.jit(lambda b: module.apply(variables, b))
    return {**_camcore_runs("jax", (module, variables), jax.numpy.asarray(x), batch_size, results, infos),
            "jax floor": _floor(forward, x, batch_size)}


def make_runners(frameworks, batch_size):
    torch_model, x = setup()
    results, infos, runs = {}, {}, {}
    for fw in frameworks:
        runs.update({"keras": keras_runners, "jax": jax_runners}[fw](torch_model, x, batch_size, results, infos))
    return {k: (run, lambda: None) for k, run in runs.items()}, results, infos


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="keras,jax")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    add_child_arguments(parser, warmup=1)
    args = parser.parse_args(argv)
    frameworks = args.frameworks.split(",")
    runners, results, infos = make_runners(frameworks, args.batch_size)
    if args._memory or args._fresh:
        memory_child(runners, args.repeats, args.warmup) if args._memory else fresh_child(runners, args._fresh)
        return

    for run, _ in runners.values():  # warm-up: traces and compiles every graph
        run()
    times, _, _ = measure(runners, args.repeats, None)
    import jax
    import keras

    print(f"EfficientNet-Lite0 port, 1 photo, layer {LAYER!r} (1280 channels), batch_size {args.batch_size}, "
          f"keras {keras.__version__}, jax {jax.__version__}")
    for key, info in infos.items():
        print(f"  {key}: {info}")
    if "keras" in frameworks:
        ours, theirs = results["keras camcore score"], results["keras tkv score"]
        print(f"  max |camcore - tf-keras-vis| Score-CAM maps at 224x224: {np.abs(ours - theirs).max():.3g} "
              f"(mask grids differ: tests/test_parity_tf_keras_vis.py)")
    if set(frameworks) == {"keras", "jax"}:
        for m in ("ablation", "score"):
            d = np.abs(results[f"keras camcore {m}"] - results[f"jax camcore {m}"]).max()
            print(f"  max |keras - jax| camcore {m} maps: {d:.3g}")
    mems, _, how = cpu_memory(__file__, list(runners), 1, 1, 1,
                              extra=["--frameworks", args.frameworks, "--batch-size", str(args.batch_size)])
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: statistics.median(v) for k, v in mems.items()}
    print(f"  peak memory: {how}")
    for k in runners:
        print(f"  {k:24s} {med[k]:8.2f} s   peak {peak[k]:8.1f} MiB   samples {[round(t, 2) for t in times[k]]}")
    for fw in frameworks:
        pairs = [(f"{fw} camcore score", f"{fw} floor"), (f"{fw} camcore ablation", f"{fw} camcore score")]
        if fw == "keras":
            pairs.insert(0, ("keras camcore score", "keras tkv score"))
        for a, b in pairs:
            print(f"  {a} / {b}: time {med[a] / med[b]:.4f}, peak memory {peak[a] / max(peak[b], 1e-9):.3f}")


if __name__ == "__main__":
    main()
