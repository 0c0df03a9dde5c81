"""Guided Grad-CAM at ``_conv_head`` of the pretrained EfficientNet-Lite0, batch 8: camcore vs captum's
``GuidedGradCam`` vs pytorch-grad-cam (its ``GradCAM`` for the batch, then its ``GuidedBackpropReLUModel`` looped
over the samples, one forward and backward each, as its example does).

    python benchmarks/bench_guided_torch.py [--batch 8] [--repeats 5]

Median wall times in this process (alternating order after a warm-up) and peak memory per run (the increase of
peak RSS over the RSS before the run, in a child process with a fixed mmap threshold: see
``bench_gradcam_torch.py``), as ratios to camcore. The three do not compute the same thing on this model: its
ReLU6 units are ``nn.ReLU6`` modules, which captum and pytorch-grad-cam do not guide (both rewrite ``nn.ReLU``
only), so they return Grad-CAM times the *plain* input gradient; the script prints how far their results are
from camcore's and from camcore's with plain gradients.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import warnings

import numpy as np
import torch
from memprobe import MMAP_ENV, add_child_arguments, cpu_memory, measure, memory_child

LAYER = "_conv_head"
LIBS = ("camcore", "captum", "pgc")


def setup(batch: int):
    from camcore.demo import PHOTOS, TARGETS, load_model, load_photo, to_tensor

    model = load_model()
    x = to_tensor([load_photo(n) for n in PHOTOS])
    reps = (batch + len(PHOTOS) - 1) // len(PHOTOS)
    targets = ([TARGETS[n] for n in PHOTOS] * reps)[:batch]
    return model, x.repeat(reps, 1, 1, 1)[:batch].contiguous(), targets


def make_runners(model, x, targets):
    import camcore
    from captum.attr import GuidedGradCam
    from pytorch_grad_cam import GradCAM, GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    explainer = camcore.Explainer(model, method="guided-gradcam", layer=LAYER)
    cap_model = copy.deepcopy(model)
    cap = GuidedGradCam(cap_model, dict(cap_model.named_modules())[LAYER])
    pgc_model = copy.deepcopy(model)
    pgc_cam = GradCAM(pgc_model, [dict(pgc_model.named_modules())[LAYER]])
    pgc_gb = GuidedBackpropReLUModel(pgc_model, device="cpu")
    results = {}

    def run_camcore():
        results["camcore"] = explainer(x, targets=targets).numpy()

    def run_captum():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = cap.attribute(x.clone().requires_grad_(True), target=targets, interpolate_mode="bilinear")
        results["captum"] = out.detach().numpy()

    def run_pgc():
        cams = pgc_cam(x, [ClassifierOutputTarget(t) for t in targets])  # (B, H, W) in [0, 1]
        rows = [pgc_gb(x[i : i + 1].clone(), target_category=t).transpose(2, 0, 1) * cams[i][None]
                for i, t in enumerate(targets)]
        results["pgc"] = np.stack(rows)

    def after(lib):
        def clean():
            results.pop(lib, None)
            for m in (cap_model, pgc_model):
                m.zero_grad(set_to_none=True)
            pgc_cam.outputs = None
            pgc_cam.activations_and_grads.activations.clear()
            pgc_cam.activations_and_grads.gradients.clear()
        return clean

    runs = {"camcore": run_camcore, "captum": run_captum, "pgc": run_pgc}
    return {lib: (runs[lib], after(lib)) for lib in LIBS}, results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    add_child_arguments(parser, warmup=1)
    args = parser.parse_args(argv)
    batch = args.batch or 8
    model, x, targets = setup(batch)
    runners, results = make_runners(model, x, targets)
    if args._memory:
        memory_child(runners, args.repeats, args.warmup)
        return
    for _ in range(args.warmup):
        for lib in LIBS:
            runners[lib][0]()
    import camcore

    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg)[torch.arange(batch), targets].sum(), xg)
    print(f"batch {tuple(x.shape)}, layer {LAYER!r}, torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads, {args.repeats} repeats after {args.warmup} warm-up run(s)")
    for lib, normalize in (("captum", False), ("pgc", True)):  # captum multiplies by the raw map
        ours = camcore.explain(model, x, method="guided-gradcam", layer=LAYER, targets=targets, normalize=normalize)
        cam = camcore.explain(model, x, method="gradcam", layer=LAYER, targets=targets, normalize=normalize)
        plain, scale = (cam[:, None] * g).numpy(), float(ours.abs().max())
        print(f"max |{lib} - camcore| / max|camcore| = {np.abs(results[lib] - ours.numpy()).max() / scale:.3g}; "
              f"max |{lib} - camcore's map x the plain gradient| / max = {np.abs(results[lib] - plain).max() / scale:.3g}")
    for lib in LIBS:
        runners[lib][1]()
    times, _, _ = measure(runners, args.repeats, None)
    mems, _, how = cpu_memory(__file__, LIBS, batch, args.repeats, args.warmup)
    print(f"timing: this process ({MMAP_ENV}={os.environ.get(MMAP_ENV, 'unset: dynamic')}); peak memory: {how}")
    t0 = statistics.median(times["camcore"])
    m0 = statistics.median(mems["camcore"]) if mems.get("camcore") else None
    for lib in LIBS:
        t = statistics.median(times[lib])
        m = statistics.median(mems[lib]) if mems.get(lib) else float("nan")
        print(f"{lib:>8}: median {t * 1e3:8.1f} ms (camcore/{lib} {t0 / t:.3f}), peak {m:7.1f} MiB"
              + (f" (camcore/{lib} {m0 / m:.3f})" if m0 else ""))


if __name__ == "__main__":
    main()
