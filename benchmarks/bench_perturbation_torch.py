"""Gradient-free methods on the pretrained EfficientNet-Lite0: camcore vs pytorch-grad-cam and torch-cam.

    python benchmarks/bench_perturbation_torch.py [--photos 1] [--batch-size 32] [--repeats 3]

Side by side in one process, same layer (``_conv_head``, 1280 channels, the last conv), same photos, same
``batch_size`` (masked copies per forward pass):

- Ablation-CAM: camcore (the layers before ``_conv_head`` once per photo, only the layers after it per ablated
  channel, see ``backends/torch_tail.py``) vs pytorch-grad-cam ``AblationCAM`` (which reuses the layer's cached
  output but reruns every layer before it for each batch of ablations);
- Score-CAM: camcore vs pytorch-grad-cam ``ScoreCAM`` and torch-cam ``ScoreCAM``, and the *floor*: the same
  number of plain ``torch.no_grad`` forward passes of the model at the same batch size, which no Score-CAM
  without deduplication can beat;
- camcore Score-CAM at ``_swish`` (the activation after ``_conv_head``: ReLU6 leaves many channels all-zero,
  whose masks are all the same zero mask and are scored once) vs the floor for all 1280 channels.

Each peer gets its own deep copy of the model (their hooks stay on it). Wall times: median of ``--repeats``
runs in alternating order, after one warm-up forward pass of each model (a run takes a minute per photo, so
start-up effects are negligible and no whole run is spent on warming up). Peak memory: one child process
holding all runners, with a fixed glibc mmap threshold, VmHWM reset before each run (see ``memprobe.py``);
one measured run per runner. The peers' own tqdm bars go to stderr.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import numpy as np
import torchvision  # noqa: F401  (before any TensorFlow import, see docs/adapters.md)
import torch
from memprobe import add_child_arguments, cpu_memory, fresh_child, measure, memory_child

LAYER = "_conv_head"


def setup(photos: int):
    from camcore.demo import PHOTOS, load_model, load_photo, to_tensor

    model = load_model()
    x = to_tensor([load_photo(PHOTOS[i % len(PHOTOS)]) for i in range(photos)])
    return model, x


def make_runners(model, x, batch_size: int):
    import camcore
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from torchcam.methods import ScoreCAM as TorchCamScoreCAM

    channels = dict(model.named_modules())[LAYER].out_channels
    results, infos = {}, {}
    pgc_abl_model, pgc_score_model, tc_model = (copy.deepcopy(model) for _ in range(3))
    pgc_abl = AblationCAM(pgc_abl_model, [dict(pgc_abl_model.named_modules())[LAYER]], batch_size=batch_size)
    pgc_score = ScoreCAM(pgc_score_model, [dict(pgc_score_model.named_modules())[LAYER]])
    pgc_score.batch_size = batch_size  # read by pytorch-grad-cam's ScoreCAM (default 16)
    tc_score = TorchCamScoreCAM(tc_model, LAYER, batch_size=batch_size, input_shape=tuple(x.shape[1:]))
    chunk = x[:1].expand(batch_size, *x.shape[1:]).contiguous()

    def camcore_run(method, layer, key):  # one persistent Explainer, as the peers' CAM objects are persistent
        explainer = camcore.Explainer(model, method=method, layer=layer, batch_size=batch_size, progress=False)

        def run():
            info = {}
            results[key] = explainer(x, info=info)
            infos[key] = info
        return run

    def pgc_run(cam, key):
        def run():
            results[key] = cam(x, None)
        return run

    def tc_run():
        with torch.no_grad():
            out = tc_model(x)
        results["torchcam score"] = tc_score(out.argmax(1).tolist(), out)[0]

    def floor():  # the forward passes Score-CAM needs at least: one per channel, per photo
        with torch.no_grad():
            for _ in range(x.shape[0]):
                for start in range(0, channels, batch_size):
                    model(chunk[: min(batch_size, channels - start)])

    def keep():  # results are one small map per photo: kept, to compare them after timing
        return None

    runners = {
        "camcore ablation": (camcore_run("ablationcam", LAYER, "camcore ablation"), keep),
        "pgc ablation": (pgc_run(pgc_abl, "pgc ablation"), keep),
        "camcore score": (camcore_run("scorecam", LAYER, "camcore score"), keep),
        "pgc score": (pgc_run(pgc_score, "pgc score"), keep),
        "torchcam score": (tc_run, keep),
        "floor": (floor, lambda: None),
        "camcore score _swish": (camcore_run("scorecam", "_swish", "camcore score _swish"), keep),
    }
    return runners, results, infos


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated parts of runner names, e.g. 'ablation'")
    add_child_arguments(parser, warmup=0)
    args = parser.parse_args(argv)
    photos = args.batch or args.photos
    def only(runners):
        parts = [p for p in args.only.split(",") if p]
        return {k: v for k, v in runners.items() if not parts or any(p in k for p in parts)}

    if args._memory or args._fresh:
        runners = only(make_runners(*setup(photos), args.batch_size)[0])
        memory_child(runners, args.repeats, args.warmup) if args._memory else fresh_child(runners, args._fresh)
        return

    model, x = setup(photos)
    runners, results, infos = make_runners(model, x, args.batch_size)
    runners = only(runners)
    with torch.no_grad():
        model(x)  # warm-up
    times, _, _ = measure(runners, args.repeats, None)
    print(f"EfficientNet-Lite0, {photos} photo(s) {tuple(x.shape)}, layer {LAYER!r} (1280 channels), batch_size "
          f"{args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for key in ("camcore ablation", "camcore score", "camcore score _swish"):
        if key in infos:
            print(f"  {key}: {infos[key]}")
    if "pgc ablation" in results and "camcore ablation" in results:
        pg = results["pgc ablation"]
        print(f"  max |camcore - pgc| ablation maps: {np.abs(results['camcore ablation'].numpy() - pg).max():.3g} "
              f"(pgc ablates with min(A) - 1e7 where min(A) != 0 and resizes with cv2; see tests for the parity)")
    mems, _, how = cpu_memory(__file__, list(runners), photos, 1, 0,
                              extra=["--batch-size", str(args.batch_size), "--only", args.only])
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: statistics.median(v) for k, v in mems.items()}
    print(f"  peak memory: {how}")
    for k in runners:
        print(f"  {k:22s} {med[k]:8.2f} s   peak {peak[k]:8.1f} MiB   samples {[round(t, 2) for t in times[k]]}")

    def ratio(a, b, target, op):
        if a not in med or b not in med:
            return
        r = med[a] / med[b]
        ok = r <= target if op == "<=" else r >= target
        print(f"  {a} / {b}: time {r:.4f} (target {op} {target}: {'met' if ok else 'MISSED'}), "
              f"peak memory {peak[a] / max(peak[b], 1e-9):.3f}")

    ratio("camcore ablation", "pgc ablation", 1 / 50, "<=")
    ratio("camcore score", "pgc score", 0.5, "<=")
    ratio("camcore score", "torchcam score", 0.5, "<=")
    ratio("camcore score", "floor", 1.2, "<=")
    ratio("pgc score", "floor", 1e9, "<=")
    ratio("torchcam score", "floor", 1e9, "<=")
    ratio("camcore score _swish", "floor", 1.2, "<=")


if __name__ == "__main__":
    main()
