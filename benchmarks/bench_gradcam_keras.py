"""Grad-CAM at ``_conv_head`` of the pretrained EfficientNet-Lite0 ported to Keras 3: camcore vs tf-keras-vis.

Times both libraries in alternating order after a warm-up and reports median wall times, peak memory per run
(the increase of the process's peak RSS over the RSS just before the run) and their ratios, plus the max abs
difference of the two results at the layer's resolution.

    python benchmarks/bench_gradcam_keras.py [--batch 8] [--repeats 7] [--mem-repeats 3] [--warmup 2]
                                             [--malloc-default]

The model is ``camcore.ports.keras_efficientnet_lite(camcore.demo.load_model())``; the batch repeats the
four real photos. Both libraries do the same job: the same explicit per-sample classes (each sample's top class,
computed once beforehand: tf-keras-vis has no top-class default), Grad-CAM at ``_conv_head``, upsampled to
224 x 224 and normalised -- camcore ``explain(kmodel, x, method="gradcam", layer="_conv_head", targets=top)``,
tf-keras-vis ``Gradcam(kmodel, model_modifier=None, clone=False)(CategoricalScore(top), x,
penultimate_layer="_conv_head")``, its ``Gradcam`` object built once, as a user would. (tf-keras-vis builds a
new ``keras.Model`` cut at the layer inside every call; that is part of what it costs.) The two upsample on
different grids (corner-aligned ``scipy.ndimage.zoom`` vs half-pixel centres; see
``tests/test_parity_tf_keras_vis.py``), so the maps are compared at the layer's resolution, where they must agree.

CPU peak RSS is reset between runs by writing ``5`` to ``/proc/self/clear_refs`` (after ``gc.collect()`` and
``malloc_trim(0)``); where that is not possible, each library is measured once in a fresh subprocess instead.
As in ``bench_gradcam_torch.py``, timings are taken in this process with the allocator as configured, and memory
in one child process holding both libraries (alternating) run with ``MALLOC_MMAP_THRESHOLD_=131072``
(``--malloc-default``: measure here instead), so that every large buffer is its own mapping and RSS follows live
memory whatever ran before (glibc's dynamic threshold would otherwise let an earlier run's freed heap serve, or
inflate, the next one). TensorFlow's CPU allocator takes its memory from ``malloc``, so the same method applies.
Peak memory is deterministic to 0.1 MiB from run to run, hence fewer memory repeats than timing repeats by default
(the whole default run takes about 2 minutes on 2 cores). TensorFlow here is ``tensorflow-cpu``: there is no
GPU path.
"""
from __future__ import annotations

import argparse
import os
import statistics
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from memprobe import MMAP_ENV as _MMAP_ENV  # noqa: E402
from memprobe import cpu_memory, fresh_child, measure, memory_child  # noqa: E402

LAYER = "_conv_head"
_LIBS = {"camcore": "camcore", "tkv": "tf-keras-vis"}


# ------------------------------------------------------------------------------------------ the two runs
def setup(batch: int):
    """The Keras port of the pretrained model, ``(batch, 224, 224, 3)`` float32 NumPy photos, each sample's top
    class (one forward pass, outside every measurement)."""
    from camcore.ports import keras_efficientnet_lite
    from camcore.demo import MEAN, PHOTOS, STD, load_model, load_photo

    kmodel = keras_efficientnet_lite(load_model())  # the torch model is only read, then dropped
    photos = (np.stack([load_photo(n) for n in PHOTOS]) - MEAN) / STD
    reps = (batch + len(PHOTOS) - 1) // len(PHOTOS)
    x = np.ascontiguousarray(np.tile(photos, (reps, 1, 1, 1))[:batch], dtype=np.float32)
    top = np.asarray(kmodel(x, training=False)).argmax(axis=1).tolist()
    return kmodel, x, top


def make_runners(kmodel, x, top):
    import camcore

    with warnings.catch_warnings():  # tf-keras-vis imports the deprecated scipy.ndimage.interpolation
        warnings.simplefilter("ignore", DeprecationWarning)
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.utils.scores import CategoricalScore

    tkv_cam = Gradcam(kmodel, model_modifier=None, clone=False)
    score = CategoricalScore(top)
    results = {}

    def run_camcore():
        results["camcore"] = camcore.explain(kmodel, x, method="gradcam", layer=LAYER, targets=top)

    def run_tkv():
        results["tkv"] = tkv_cam(score, x, penultimate_layer=LAYER)

    def after(lib):
        return lambda: results.pop(lib, None)

    return {"camcore": (run_camcore, after("camcore")), "tkv": (run_tkv, after("tkv"))}, results


def layer_resolution_diff(kmodel, x, top) -> float:
    """max |camcore - tf-keras-vis| at the layer's resolution, both normalised per sample (outside the timings)."""
    import camcore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.utils.scores import CategoricalScore

    ours = camcore.explain(kmodel, x, method="gradcam", layer=LAYER, targets=top, upsample=False)
    theirs = np.asarray(Gradcam(kmodel, model_modifier=None, clone=False)(
        CategoricalScore(top), x, penultimate_layer=LAYER, expand_cam=False))
    return float(np.abs(ours - theirs).max())


# --------------------------------------------------------------------------------------------------- main
def report(times, mems, held):
    cc_t, tk_t = statistics.median(times["camcore"]), statistics.median(times["tkv"])
    print(f"[cpu] median time   camcore {cc_t * 1e3:8.1f} ms   tf-keras-vis {tk_t * 1e3:8.1f} ms   "
          f"ratio camcore/tf-keras-vis {cc_t / tk_t:.3f}")
    if mems:
        cc_m, tk_m = statistics.median(mems["camcore"]), statistics.median(mems["tkv"])
        print(f"[cpu] median peak   camcore {cc_m:8.1f} MiB  tf-keras-vis {tk_m:8.1f} MiB  "
              f"ratio camcore/tf-keras-vis {cc_m / tk_m:.3f}")
        print(f"[cpu] peak samples  camcore {[round(v, 1) for v in mems['camcore']]}  "
              f"tf-keras-vis {[round(v, 1) for v in mems['tkv']]} (MiB)")
    if held and held["camcore"]:
        print(f"[cpu] still held after the call returns (median): camcore "
              f"{statistics.median(held['camcore']):.1f} MiB, tf-keras-vis {statistics.median(held['tkv']):.1f} MiB")
    print(f"[cpu] time samples  camcore {[round(v * 1e3, 1) for v in times['camcore']]}  "
          f"tf-keras-vis {[round(v * 1e3, 1) for v in times['tkv']]} (ms)")


def bench(batch: int, repeats: int, mem_repeats: int, warmup: int, malloc_default: bool = False) -> None:
    import keras
    import tensorflow as tf

    kmodel, x, top = setup(batch)
    runners, results = make_runners(kmodel, x, top)
    for _ in range(warmup):
        for lib in runners:
            runners[lib][0]()
    cc, tk = np.asarray(results["camcore"]), np.asarray(results["tkv"])
    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    print(f"[cpu] batch {x.shape}, layer {LAYER!r}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{threads} CPU threads, {repeats} timing / {mem_repeats} memory repeats after {warmup} warm-up run(s)")
    print(f"[cpu] results: camcore {cc.shape} {cc.dtype}, tf-keras-vis {tk.shape} {tk.dtype}; max |camcore - "
          f"tf-keras-vis| at the layer's resolution (7x7) = {layer_resolution_diff(kmodel, x, top):.3g}, at "
          f"224x224 = {np.abs(cc - tk).max():.3g} (different upsampling grids, not an error)")
    for lib in runners:
        runners[lib][1]()

    times, _, _ = measure(runners, repeats, None)
    print(f"[cpu] timing: this process, glibc malloc as configured ({_MMAP_ENV}="
          f"{os.environ.get(_MMAP_ENV, 'unset: dynamic')})")
    mems, held, how = cpu_memory(__file__, _LIBS, batch, mem_repeats, warmup, runners if malloc_default else None)
    print(f"[cpu] peak memory: {how}")
    report(times, mems, held)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats per library")
    parser.add_argument("--mem-repeats", type=int, default=3, help="peak-memory repeats per library")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--malloc-default", action="store_true",
                        help="measure CPU memory in this process with glibc's dynamic mmap threshold (then the "
                             "peak of a run depends on what ran before it)")
    parser.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_fresh", choices=list(_LIBS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        memory_child(make_runners(*setup(args.batch))[0], args.repeats, args.warmup)
        return
    if args._fresh:
        fresh_child(make_runners(*setup(args.batch))[0], args._fresh)
        return
    bench(args.batch, args.repeats, args.mem_repeats, args.warmup, args.malloc_default)


if __name__ == "__main__":
    main()
