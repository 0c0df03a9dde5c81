"""Grad-CAM at ``_conv_head`` of the pretrained EfficientNet-Lite0: camcore vs pytorch-grad-cam.

Times both libraries in alternating order after a warm-up and reports median wall times, peak memory per run
(CPU: the increase of the process's peak RSS over the RSS just before the run; GPU: ``max_memory_allocated``
over the memory allocated before the run) and their ratios, plus the max abs difference of the two results.

    python benchmarks/bench_gradcam_torch.py [--batch 8] [--repeats 7] [--device cpu|cuda|auto]

CPU peak RSS is reset between runs by writing ``5`` to ``/proc/self/clear_refs`` (after ``gc.collect()`` and
``malloc_trim(0)``); where that is not possible, each library is measured once in a fresh subprocess instead.
pytorch-grad-cam gets its own deep copy of the model (it accumulates parameter gradients); its ``GradCAM``
object is built once, as a user would. pytorch-grad-cam keeps the last call's autograd graph alive
(``loss.backward(retain_graph=True)``, ``self.outputs``) and the parameter gradients: the memory still held
after each call returns is reported too, then released outside the measurement, so that every run of either
library starts from the same heap.

Timings are taken in this process with the allocator as configured. CPU memory is measured in one child process
(both libraries, alternating) run with ``MALLOC_MMAP_THRESHOLD_=131072`` (``--malloc-default``: measure here
instead): under glibc's default *dynamic* mmap threshold, once any full backward pass has run in the process
(pytorch-grad-cam's), blocks up to 32 MiB are served from the heap and even plain ``torch.no_grad()`` inference
of this model shows a peak RSS increase of ~380 MiB instead of ~150 MiB, so in one process the figure of a run
would depend on what ran before it. With a fixed threshold every large tensor is its own mapping and RSS follows live memory whatever the order
(that setting costs ~4x in run time -- mmap and page faults per tensor -- hence it is kept out of the timings).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics

import numpy as np
from memprobe import MMAP_ENV as _MMAP_ENV
from memprobe import cpu_memory, fresh_child, measure, memory_child
import torch

LAYER = "_conv_head"


# ------------------------------------------------------------------------------------------ memory probes
def gpu_peak_increase_mib(fn) -> tuple[float, float]:
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    gc.collect()
    return peak / 2**20, (torch.cuda.memory_allocated() - before) / 2**20


# ------------------------------------------------------------------------------------------ the two runs
def setup(batch: int, device: str):
    from camcore.demo import PHOTOS, load_model, load_photo, to_tensor

    model = load_model().to(device)
    x = to_tensor([load_photo(n) for n in PHOTOS])
    x = x.repeat((batch + len(PHOTOS) - 1) // len(PHOTOS), 1, 1, 1)[:batch].contiguous().to(device)
    return model, x


def make_runners(model, x):
    import camcore
    from pytorch_grad_cam import GradCAM

    pgc_model = copy.deepcopy(model)
    pgc_cam = GradCAM(pgc_model, [dict(pgc_model.named_modules())[LAYER]])
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    results = {}

    def run_camcore():
        out = camcore.explain(model, x, method="gradcam", layer=LAYER)
        sync()
        results["camcore"] = out

    def run_pgc():
        out = pgc_cam(x, None)  # None: each sample's top class, as camcore's default
        sync()
        results["pgc"] = out

    def after_pgc():  # outside the measured region: start every run from the same state
        # pgc keeps the last call's autograd graph alive (loss.backward(retain_graph=True) and self.outputs), and
        # the parameter gradients; drop both, or the next run of either library starts from a different heap
        pgc_cam.outputs = None
        pgc_cam.activations_and_grads.activations.clear()
        pgc_cam.activations_and_grads.gradients.clear()
        pgc_model.zero_grad(set_to_none=True)
        results.pop("pgc", None)

    def after_camcore():
        results.pop("camcore", None)

    return {"camcore": (run_camcore, after_camcore), "pgc": (run_pgc, after_pgc)}, results


# --------------------------------------------------------------------------------------------------- main
def report(device: str, times, mems, held, target_t=0.7, target_m=0.6):
    cc_t, pg_t = statistics.median(times["camcore"]), statistics.median(times["pgc"])
    print(f"[{device}] median time   camcore {cc_t * 1e3:8.1f} ms   pytorch-grad-cam {pg_t * 1e3:8.1f} ms   "
          f"ratio camcore/pgc {cc_t / pg_t:.3f}  (target <= {target_t}: {'met' if cc_t / pg_t <= target_t else 'MISSED'})")
    if mems:
        cc_m, pg_m = statistics.median(mems["camcore"]), statistics.median(mems["pgc"])
        print(f"[{device}] median peak   camcore {cc_m:8.1f} MiB  pytorch-grad-cam {pg_m:8.1f} MiB  "
              f"ratio camcore/pgc {cc_m / pg_m:.3f}  (target <= {target_m}: {'met' if cc_m / pg_m <= target_m else 'MISSED'})")
        print(f"[{device}] peak samples  camcore {[round(v, 1) for v in mems['camcore']]}  "
              f"pgc {[round(v, 1) for v in mems['pgc']]} (MiB)")
    if held and held["camcore"]:
        print(f"[{device}] still held after the call returns (median): camcore "
              f"{statistics.median(held['camcore']):.1f} MiB, pytorch-grad-cam {statistics.median(held['pgc']):.1f} MiB")
    print(f"[{device}] time samples  camcore {[round(v * 1e3, 1) for v in times['camcore']]}  "
          f"pgc {[round(v * 1e3, 1) for v in times['pgc']]} (ms)")


def bench(device: str, batch: int, repeats: int, warmup: int, malloc_default: bool = False) -> None:
    model, x = setup(batch, device)
    runners, results = make_runners(model, x)
    for _ in range(warmup):
        for lib in runners:
            runners[lib][0]()
    cc = results["camcore"]
    pg = results["pgc"]
    print(f"[{device}] batch {tuple(x.shape)}, layer {LAYER!r}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {repeats} repeats after {warmup} warm-up run(s)")
    print(f"[{device}] camcore result: {tuple(cc.shape)} {cc.dtype} on {cc.device}; "
          f"max |camcore - pgc| = {np.abs(cc.cpu().numpy() - pg).max():.3g}")
    if cc.device != x.device:
        print(f"[{device}] WARNING: camcore's result is on {cc.device}, the inputs on {x.device}")
    for lib in runners:
        runners[lib][1]()

    if device == "cpu":
        times, _, _ = measure(runners, repeats, None)
        print(f"[cpu] timing: this process, glibc malloc as configured ({_MMAP_ENV}="
              f"{os.environ.get(_MMAP_ENV, 'unset: dynamic')})")
        mems, held, how = cpu_memory(__file__, ("camcore", "pgc"), batch, repeats, warmup,
                                     runners if malloc_default else None)
        print(f"[cpu] peak memory: {how}")
    else:
        print(f"[{device}] peak memory: torch.cuda.max_memory_allocated minus memory_allocated before each run")
        times, mems, held = measure(runners, repeats, gpu_peak_increase_mib)
    report(device, times, mems, held)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the CPU, and the GPU too when torch.cuda.is_available()")
    parser.add_argument("--malloc-default", action="store_true",
                        help="measure CPU memory in this process with glibc's dynamic mmap threshold (then the "
                             "peak of a run depends on what ran before it)")
    parser.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_fresh", choices=["camcore", "pgc"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        memory_child(make_runners(*setup(args.batch, "cpu"))[0], args.repeats, args.warmup)
        return
    if args._fresh:
        fresh_child(make_runners(*setup(args.batch, "cpu"))[0], args._fresh)
        return
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    for device in devices:
        bench(device, args.batch, args.repeats, args.warmup, args.malloc_default)


if __name__ == "__main__":
    main()
