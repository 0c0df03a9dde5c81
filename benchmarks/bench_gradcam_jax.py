"""Grad-CAM at ``_conv_head`` of the pretrained EfficientNet-Lite0 on JAX: eager vs ``jax.jit`` vs PyTorch.

The same real model on two frameworks: the PyTorch original and camcore's Flax linen port of its weights
(``camcore.ports``). Reports, for batch 8 of real photos, the first call (eager: every op compiles;
jit: tracing + XLA compilation) and the median of repeated calls, their ratios, and the max abs difference of
the maps between the three paths.

    python benchmarks/bench_gradcam_jax.py [--batch 8] [--repeats 7]

On a GPU machine JAX and torch use it when present; the script then also checks that the maps stay on the
device (``jax.Array.devices()``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

LAYER = "_conv_head"


def timed(fn, repeats):
    """(first call in seconds, median of ``repeats`` later calls in seconds, last result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    import camcore
    from camcore.ports import flax_efficientnet_lite
    from camcore.demo import PHOTOS, load_model, load_photo, to_tensor

    photos = [load_photo(PHOTOS[i % len(PHOTOS)]) for i in range(args.batch)]
    tmodel = load_model()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmodel = tmodel.to(device)
    xt = to_tensor(photos).to(device)
    module, variables = flax_efficientnet_lite(tmodel.cpu())
    tmodel.to(device)
    xj = jnp.asarray(np.moveaxis(to_tensor(photos).numpy(), 1, -1))
    with torch.no_grad():
        targets = tmodel(xt).argmax(1).tolist()  # the same explicit classes for every path

    def explain_jax(v, x):
        return camcore.explain((module, v), x, method="gradcam", layer=LAYER, targets=targets)

    jitted = jax.jit(explain_jax)
    runs = {
        "torch": lambda: camcore.explain(tmodel, xt, method="gradcam", layer=LAYER, targets=targets),
        "jax eager": lambda: explain_jax(variables, xj).block_until_ready(),
        "jax jit": lambda: jitted(variables, xj).block_until_ready(),
    }
    results = {name: timed(fn, args.repeats) for name, fn in runs.items()}
    maps = {name: np.asarray(r[2].cpu() if name == "torch" else r[2]) for name, r in results.items()}

    print(f"Grad-CAM at {LAYER!r}, EfficientNet-Lite0, batch {args.batch}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} on {device}")
    print(f"{'path':<10} {'first call':>12} {'median':>10} {'median / jax jit':>17}")
    jit_median = results["jax jit"][1]
    for name, (first, median, _) in results.items():
        print(f"{name:<10} {first * 1e3:>10.1f}ms {median * 1e3:>8.1f}ms {median / jit_median:>17.2f}")
    print(f"jit speed-up over eager on repeated calls: {results['jax eager'][1] / jit_median:.1f}x")
    for name in ("jax eager", "jax jit"):
        print(f"max |{name} - torch| = {np.max(np.abs(maps[name] - maps['torch'])):.2e}")
    print(f"map devices: {results['jax jit'][2].devices()}")


if __name__ == "__main__":
    main()
