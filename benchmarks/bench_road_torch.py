"""ROAD, most relevant first at the percentiles 10..90, on the pretrained EfficientNet-Lite0, batch 8, Grad-CAM maps
at ``_conv_head``: camcore's ``metrics.road`` (every image and percentile imputed at once by multigrid-preconditioned
CG, scored in chunks of 32) vs pytorch-grad-cam's ``ROADMostRelevantFirstAverage`` (a SciPy sparse LU solve per
image and percentile, one forward pass per percentile).

    python benchmarks/bench_road_torch.py [--batch 8] [--repeats 3]

Median wall times in this process (alternating order after a warm-up) and peak memory per run (the increase of
peak RSS over the RSS before the run, in a child process with a fixed mmap threshold: see
``bench_gradcam_torch.py``), as ratios to camcore. Both add their imputation noise (``0.01 N(0, 1)``, camcore's
seeded, pytorch-grad-cam's from ``torch.randn``), so their timed scores differ by the noise; the script first runs
both with the noise off and prints how far apart the scores are (camcore's minus the probability on the image,
which is what pytorch-grad-cam returns). Then the imputation alone, the 72 images (8 samples x 9 percentiles) with
no model: camcore's ``noisy_linear_imputation`` 8 images at a time (as ``road`` runs it) vs pytorch-grad-cam's
``NoisyLinearImputer`` per image; the rest of ROAD is the model's forward passes, the same work for both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import warnings

import numpy as np
import torch
from memprobe import MMAP_ENV, add_child_arguments, cpu_memory, measure, memory_child

LAYER = "_conv_head"
LIBS = ("camcore", "pgc")
PERCENTILES = [10, 20, 30, 40, 50, 60, 70, 80, 90]


def setup(batch: int):
    import camcore
    from camcore.demo import PHOTOS, TARGETS, load_model, load_photo, to_tensor

    model = load_model()
    x = to_tensor([load_photo(n) for n in PHOTOS])
    reps = (batch + len(PHOTOS) - 1) // len(PHOTOS)
    targets = ([TARGETS[n] for n in PHOTOS] * reps)[:batch]
    x = x.repeat(reps, 1, 1, 1)[:batch].contiguous()
    cams = camcore.explain(model, x, method="gradcam", layer=LAYER, targets=targets).numpy()
    cams = cams + np.random.default_rng(0).uniform(0, 1e-6, cams.shape)  # distinct values: the same pixels removed
    return model, x, targets, cams.astype(np.float32)


def peer(noise: float):
    from pytorch_grad_cam.metrics.perturbation_confidence import (AveragerAcrossThresholds,
                                                                   PerturbationConfidenceMetric,
                                                                   RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    def metric(q):
        return PerturbationConfidenceMetric(RemoveMostRelevantFirst(q, NoisyLinearImputer(noise=noise)))

    return AveragerAcrossThresholds(metric, [100 - p for p in PERCENTILES])  # its q keeps the q % least relevant


def make_runners(model, x, targets, cams, noise=0.01):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from camcore import metrics

    pgc = peer(noise)
    peer_targets = [ClassifierOutputSoftmaxTarget(t) for t in targets]
    results = {}

    def run_camcore():
        results["camcore"] = metrics.road(model, x, cams, targets=targets, percentiles=PERCENTILES, noise=noise,
                                          progress=False)

    def run_pgc():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # NumPy on torch tensors, in pytorch-grad-cam
            results["pgc"] = pgc(x, cams, peer_targets, model)

    def after(lib):
        return lambda: results.pop(lib, None)

    runs = {"camcore": run_camcore, "pgc": run_pgc}
    return {lib: (runs[lib], after(lib)) for lib in LIBS}, results


def imputation_runners(x, cams):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from camcore.faithfulness import IMPUTE_ROWS, _ranks, _removed_counts
    from camcore.imputation import noisy_linear_imputation

    n = cams[0].size
    rank = _ranks(cams.astype(np.float64), descending=True)
    removed = torch.from_numpy(np.stack([(rank[i] < k).reshape(cams.shape[1:]) for k in _removed_counts(
        PERCENTILES, n) for i in range(len(x))]))
    rows = x.repeat(len(PERCENTILES), 1, 1, 1)

    def run_camcore():
        for s in range(0, len(rows), IMPUTE_ROWS):
            noisy_linear_imputation(rows[s : s + IMPUTE_ROWS], removed[s : s + IMPUTE_ROWS])

    def run_pgc():
        imputer = NoisyLinearImputer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for img, m in zip(rows, removed):
                imputer(img, (~m).float())

    return {"camcore": (run_camcore, lambda: None), "pgc": (run_pgc, lambda: None)}


def report(title, times, mems=None):
    print(title)
    t0 = statistics.median(times["camcore"])
    m0 = statistics.median(mems["camcore"]) if mems and mems.get("camcore") else None
    for lib in LIBS:
        t = statistics.median(times[lib])
        line = f"{lib:>8}: median {t:7.2f} s ({lib}/camcore {t / t0:5.2f}x)"
        if mems is not None:
            m = statistics.median(mems[lib]) if mems.get(lib) else float("nan")
            line += f", peak {m:7.1f} MiB" + (f" ({lib}/camcore {m / m0:.2f}x)" if m0 else "")
        print(line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    add_child_arguments(parser, warmup=1)
    args = parser.parse_args(argv)
    batch = args.batch or 8
    model, x, targets, cams = setup(batch)
    runners, results = make_runners(model, x, targets, cams)
    if args._memory:
        memory_child(runners, args.repeats, args.warmup)
        return
    exact, same = make_runners(model, x, targets, cams, noise=0.0)
    for lib in LIBS:
        exact[lib][0]()
    with torch.no_grad():
        y = model(x).softmax(1)[torch.arange(batch), targets].numpy()
    print(f"batch {tuple(x.shape)}, Grad-CAM at {LAYER!r}, MoRF at {PERCENTILES}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {args.repeats} repeats after {args.warmup} warm-up run(s)")
    print(f"noise off: max |camcore - y - pgc| = {np.abs(same['camcore'] - y - same['pgc']).max():.2g} over scores "
          f"ranging {same['pgc'].min():.3f} .. {same['pgc'].max():.3f}")
    for _ in range(args.warmup):
        for lib in LIBS:
            runners[lib][0]()
            runners[lib][1]()
    times, _, _ = measure(runners, args.repeats, None)
    mems, _, how = cpu_memory(__file__, LIBS, batch, args.repeats, args.warmup)
    print(f"timing: this process ({MMAP_ENV}={os.environ.get(MMAP_ENV, 'unset: dynamic')}); peak memory: {how}")
    report("ROAD, end to end (imputation and forward passes):", times, mems)
    impute = imputation_runners(x, cams)
    for lib in LIBS:
        impute[lib][0]()
    report("the imputation alone, 72 images:", measure(impute, args.repeats, None)[0])


if __name__ == "__main__":
    main()
