"""Score-CAM at its default settings: camcore vs pytorch-grad-cam at batch 64, and the best plain floor.

    python benchmarks/bench_scorecam_defaults.py [--layer _blocks.15] [--repeats 2]

One photo, the pretrained EfficientNet-Lite0. camcore runs with pytorch-grad-cam's weighting
(``weighting="channel-softmax"``, the same forward passes as the default) and no ``batch_size`` (it chooses the chunk
itself, :class:`camcore.perturbation.Chunker`, and gives CPU convolutions channels-last strides, see
``TorchAdapter._forward_fast``); pytorch-grad-cam ``ScoreCAM`` runs at ``batch_size = 64``. The *floors* are the same
number of plain ``torch.no_grad`` forward passes as camcore's distinct masks (``info["masked_forwards"]``) at fixed
batch sizes and memory layouts; the best of them is the floor camcore is held to. Wall times: median of
``--repeats`` runs in alternating order after a warm-up; peak memory: one child process, VmHWM reset before each
run (``memprobe.py``). Also prints a second ``camcore.Explainer`` call's trace count.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import numpy as np
import torchvision  # noqa: F401  (before any TensorFlow import, see docs/adapters.md)
import torch
from memprobe import add_child_arguments, cpu_memory, fresh_child, measure, memory_child

FLOORS = [(4, "channels_last"), (8, "channels_last"), (16, "channels_last"), (4, "contiguous"), (64, "contiguous")]


def setup():
    from camcore.demo import load_model, load_photo, to_tensor

    return load_model(), to_tensor([load_photo("chelsea")])


def make_runners(model, x, layer: str):
    import camcore
    from pytorch_grad_cam import ScoreCAM

    info: dict = {}
    camcore.explain(model, x, method="scorecam", layer=layer, targets=[281], progress=False, info=info)
    n = info["masked_forwards"]
    results = {}
    pgc_model = copy.deepcopy(model)
    pgc = ScoreCAM(pgc_model, [dict(pgc_model.named_modules())[layer]])
    pgc.batch_size = 64  # read by pytorch-grad-cam's ScoreCAM (default 16)

    def camcore_run():
        results["camcore"] = camcore.explain(model, x, method="scorecam", layer=layer, targets=[281],
                                             weighting="channel-softmax", progress=False).numpy()

    def pgc_run():
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        results["pgc"] = pgc(x, [ClassifierOutputTarget(281)])

    def floor(batch, layout):
        chunk = x.expand(batch, *x.shape[1:]).contiguous()
        chunk = chunk.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else chunk

        def run():
            with torch.no_grad():
                for start in range(0, n, batch):
                    model(chunk[: min(batch, n - start)])
        return run

    runners = {"camcore": (camcore_run, lambda: None), "pgc batch 64": (pgc_run, lambda: None)}
    runners.update({f"floor {b} {lay}": (floor(b, lay), lambda: None) for b, lay in FLOORS})
    return runners, results, n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="_blocks.15")
    parser.add_argument("--repeats", type=int, default=2)
    add_child_arguments(parser, warmup=0)
    args = parser.parse_args(argv)
    if args._memory or args._fresh:
        runners = make_runners(*setup(), args.layer)[0]
        memory_child(runners, args.repeats, args.warmup) if args._memory else fresh_child(runners, args._fresh)
        return

    import camcore

    model, x = setup()
    runners, results, n = make_runners(model, x, args.layer)
    times, _, _ = measure(runners, args.repeats, None)
    med = {k: statistics.median(v) for k, v in times.items()}
    mems, _, how = cpu_memory(__file__, list(runners), 1, 1, 0, extra=["--layer", args.layer])
    peak = {k: statistics.median(v) for k, v in mems.items()}
    print(f"EfficientNet-Lite0, 1 photo, Score-CAM at {args.layer!r}: {n} distinct masks; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  peak memory: {how}")
    for k in runners:
        print(f"  {k:26s} {med[k]:7.2f} s ({1000 * med[k] / n:5.1f} ms/mask)   peak {peak[k]:7.1f} MiB   "
              f"samples {[round(t, 2) for t in times[k]]}")
    best = min((k for k in runners if k.startswith("floor")), key=med.get)
    print(f"  camcore / pgc batch 64: time {med['camcore'] / med['pgc batch 64']:.3f} (target <= 0.333), "
          f"peak memory {peak['camcore'] / max(peak['pgc batch 64'], 1e-9):.3f}")
    print(f"  camcore / best floor ({best}): time {med['camcore'] / med[best]:.3f} (target <= 1.1)")
    ours, theirs = results["camcore"][0], results["pgc"][0]
    print(f"  max |camcore - pgc| map: {np.abs(ours - theirs).max():.3g} (pgc resizes the masks corner-aligned "
          f"and adds 1e-8 to their normaliser: docs/methods.md; tests/test_parity_perturbation.py holds the parity)")
    with camcore.Explainer(model, method="scorecam", layer=args.layer, progress=False) as explainer:
        explainer(x, targets=[281])
        first = explainer.adapter.traces()
        explainer(x, targets=[281])
        again = explainer.adapter.traces() - first
        print(f"  Explainer: graphs built by the first call {first}, by the second {again}")


if __name__ == "__main__":
    main()
