"""CPU memory probes and the alternating-order measuring loop shared by the benchmarks.

Peak memory of a run is the increase of the process's peak RSS (``VmHWM``, reset by writing ``5`` to
``/proc/self/clear_refs``) over the RSS just before it. Child processes run with a fixed glibc mmap threshold
(``MMAP_ENV``) so that RSS follows live memory whatever ran before; see ``bench_gradcam_torch.py``.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settle():
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def clear_refs_works() -> bool:
    """Touch 256 MiB, free it, reset the peak: VmHWM must drop back near VmRSS."""
    if not _reset_peak():
        return False
    _settle()
    block = np.ones(256 * 2**18, dtype=np.float32)  # 256 MiB, touched
    high = _status_kib("VmHWM")
    del block
    _settle()
    if not _reset_peak():
        return False
    after, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return high - rss > 200 * 1024 and after - rss < 16 * 1024


def cpu_peak_increase_mib(fn) -> tuple[float, float]:
    """(peak RSS during ``fn`` minus RSS before, RSS still held after it returned minus RSS before), MiB."""
    _settle()
    before = _status_kib("VmRSS")
    _reset_peak()
    fn()
    peak = _status_kib("VmHWM") - before
    _settle()
    return peak / 1024, (_status_kib("VmRSS") - before) / 1024


def measure(runners, repeats: int, probe, *, timing: bool = True):
    """Alternating order; returns {lib: [seconds]}, {lib: [peak MiB]}, {lib: [MiB still held after the call]}."""
    times = {k: [] for k in runners}
    mems = {k: [] for k in runners}
    held = {k: [] for k in runners}
    order = list(runners)
    for i in range(repeats if timing else 0):  # timing passes
        for lib in order if i % 2 == 0 else order[::-1]:
            run, after = runners[lib]
            t0 = time.perf_counter()
            run()
            times[lib].append(time.perf_counter() - t0)
            after()
    if probe is not None:
        for i in range(repeats):  # memory passes (the probes' own overhead stays out of the timings)
            for lib in order if i % 2 == 0 else order[::-1]:
                run, after = runners[lib]
                peak, kept = probe(run)
                mems[lib].append(peak)
                held[lib].append(kept)
                after()
    return times, mems, held


def add_child_arguments(parser, *, warmup: int) -> None:
    """The hidden options with which :func:`cpu_memory` starts a benchmark's memory child."""
    import argparse

    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=warmup, help=argparse.SUPPRESS)
    parser.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_fresh", help=argparse.SUPPRESS)


def run_child(script: str, args: list[str]) -> dict:
    """Run ``script`` with ``args`` in a child process with a fixed mmap threshold; its last stdout line as JSON."""
    env = {**os.environ, MMAP_ENV: "131072"}
    out = subprocess.run([sys.executable, os.path.abspath(script), *args], check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(runners, repeats: int, warmup: int) -> None:
    """Both libraries in this one process, alternating; prints JSON {mems, held, method}."""
    for _ in range(warmup):
        for lib in runners:
            runners[lib][0]()
            runners[lib][1]()
    if clear_refs_works():
        _, mems, held = measure(runners, repeats, cpu_peak_increase_mib, timing=False)
        print(json.dumps({"mems": mems, "held": held, "method": "clear_refs"}))
    else:
        print(json.dumps({"method": "none"}))


def fresh_child(runners, lib: str) -> None:
    """Fallback: one library, first run in a fresh process (VmHWM is the peak since the process started)."""
    _settle()
    before = _status_kib("VmRSS")
    runners[lib][0]()
    print(json.dumps({"peak_increase_mib": (_status_kib("VmHWM") - before) / 1024}))


def cpu_memory(script: str, libs, batch: int, repeats: int, warmup: int, runners=None, extra=()):
    """(mems, held, description) for the libraries ``libs`` of the benchmark ``script``, measured by its
    ``--_memory`` child (``--_fresh LIB`` where VmHWM cannot be reset), which also gets the arguments ``extra``;
    ``runners`` given: measure here, in this process, with the allocator as is."""
    if runners is not None:
        if not clear_refs_works():
            raise SystemExit("--malloc-default: /proc/self/clear_refs cannot reset VmHWM here")
        _, mems, held = measure(runners, repeats, cpu_peak_increase_mib, timing=False)
        return mems, held, ("in this process, glibc's default dynamic mmap threshold (depends on what ran "
                            "before); VmHWM reset via /proc/self/clear_refs, minus VmRSS before each run")
    res = run_child(script, ["--_memory", "--batch", str(batch), "--repeats", str(repeats), "--warmup", str(warmup),
                             *extra])
    if res["method"] == "clear_refs":
        return res["mems"], res["held"], (
            f"one child process holding both libraries, alternating, {MMAP_ENV}=131072; VmHWM reset via "
            f"/proc/self/clear_refs, minus VmRSS just before each run (after gc.collect() + malloc_trim(0))")
    mems = {lib: [run_child(script, ["--_fresh", lib, "--batch", str(batch), *extra])["peak_increase_mib"]]
            for lib in libs}
    return mems, {}, ("/proc/self/clear_refs cannot reset VmHWM here: FALLBACK, each library's first run in a "
                      f"fresh subprocess ({MMAP_ENV}=131072), VmHWM minus VmRSS before the run")
