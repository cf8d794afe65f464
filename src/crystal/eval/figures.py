"""The sweep's figures and tables, from eval records (crystal.eval.sweep's format).

Every file is written whole or not at all (`plots.save_png`, `fileio.atomic_open`) and
redrawn from all records of a task at each sweep, so shards running at once each leave a
complete figure of what was done when they finished.

- perplexity.png: held-out loss per source over checkpoint steps, stage boundaries dashed;
  one axis with distinct colours up to ten sources, small multiples (one panel a source,
  shared y, the pooled loss in grey for reference) beyond.
- memorization_distribution.png, memorization_chunks.png, memorization_correlation.png and
  memorization_matrix.csv: LLM360's memorization figures (crystal.eval.memorization).
- humaneval.png, humaneval_bpb.png, lm_eval-TASK.png: a task's headline metrics over
  checkpoint steps (`metric_curves`).
"""

from __future__ import annotations

import math

import numpy as np

from crystal import fileio
from crystal.metrics import plots
from crystal.metrics.plots import plt

MAX_SINGLE_AXIS = 10      # sources drawn on one axis; more get small multiples
MAX_CHUNK_GROUPS = 24     # memorization_chunks.png groups consecutive chunks beyond this


def _steps(records) -> list[int]:
    return [int(r["checkpoint"]["step"]) for r in records]


def _stage_ends(records) -> list[tuple[int, int]]:
    """(step, next stage) where a stage's last checkpoint in the records is followed by a
    checkpoint of a later stage."""
    out = []
    for a, b in zip(records, records[1:]):
        if int(b["checkpoint"]["stage"]) > int(a["checkpoint"]["stage"]):
            out.append((int(a["checkpoint"]["step"]), int(b["checkpoint"]["stage"])))
    return out


def _mark_stages(ax, ends):
    for step, stage in ends:
        ax.axvline(step, color="gray", ls="--", lw=0.8)
        ax.annotate(f"stage {stage}", (step, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -11), textcoords="offset points", fontsize=7, color="gray")


def _series(records, key):
    pts = [(int(r["checkpoint"]["step"]), r["metrics"][key]) for r in records
           if key in r.get("metrics", {}) and math.isfinite(r["metrics"][key])]
    return zip(*pts) if pts else ((), ())


def perplexity(records, path):
    """Held-out loss per source over steps (see the module docstring)."""
    sources = sorted({k[:-len("/loss")] for r in records for k in r.get("metrics", {})
                      if k.endswith("/loss")})
    ends = _stage_ends(records)
    run = records[0]["run"]["config_name"] if records else "run"
    if len(sources) <= MAX_SINGLE_AXIS:
        fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
        colours = plt.get_cmap("tab10")
        for i, src in enumerate(sources):
            ax.plot(*_series(records, f"{src}/loss"), marker="o", ms=3, lw=1.1,
                    color=colours(i), label=src)
        ax.plot(*_series(records, "loss"), color="black", lw=2, label="all sources")
        _mark_stages(ax, ends)
        ax.set(xlabel="step", ylabel="held-out loss (nats/token)",
               title=f"{run}: held-out loss per source")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        return plots.save_png(fig, path)
    cols = 4
    rows = math.ceil(len(sources) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), dpi=100,
                             sharex=True, sharey=True, squeeze=False)
    for ax, src in zip(axes.flat, sources):
        ax.plot(*_series(records, "loss"), color="0.75", lw=1.2)
        ax.plot(*_series(records, f"{src}/loss"), color="tab:blue", marker="o", ms=2.5,
                lw=1.1)
        _mark_stages(ax, ends)
        ax.set_title(src, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(sources):]:
        ax.axis("off")
    fig.supxlabel("step", fontsize=9)
    fig.supylabel("held-out loss (nats/token)", fontsize=9)
    fig.suptitle(f"{run}: held-out loss per source (grey: all sources)", fontsize=10)
    return plots.save_png(fig, path)


# ----------------------------------------------------------------------------- memorization


def metric_curves(records, keys, path, title: str):
    """`keys` of the records' metrics over steps, one line each, stage boundaries dashed."""
    run = records[0]["run"]["config_name"] if records else "run"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for key in keys:
        ax.plot(*_series(records, key), marker="o", ms=3, lw=1.2, label=key)
    _mark_stages(ax, _stage_ends(records))
    ax.set(xlabel="step", title=f"{run}: {title}")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)
    return plots.save_png(fig, path)


def _scores(record, seen_only: bool = True) -> np.ndarray:
    l = int(record["result"]["l"])
    parts = [np.asarray(c["matches"], np.float64) / l for c in record["result"]["chunks"]
             if c["seen"] or not seen_only]
    return np.concatenate(parts) if parts else np.zeros((0,))


def _colours(n):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _step_colorbar(fig, ax, steps):
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(min(steps), max(steps)))
    fig.colorbar(sm, ax=ax, label="checkpoint step")


def memorization_distribution(records, path):
    """Left: the distribution of scores of seen sequences per checkpoint (log scale).
    Right: the share of 32-extractable (score 1.0) sequences per checkpoint, annotated."""
    steps = _steps(records)
    l = int(records[0]["result"]["l"]) if records else 32
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
    edges = (np.arange(l + 2) - 0.5) / l
    shares = []
    for r, c in zip(records, _colours(len(records))):
        s = _scores(r)
        shares.append(float(np.mean(s == 1.0)) if len(s) else 0.0)
        if len(s):
            counts, _ = np.histogram(s, bins=edges)
            share = np.where(counts > 0, counts / len(s), np.nan)   # log axis: no zeros
            ax.plot(np.arange(l + 1) / l, share, color=c, lw=1, marker=".", ms=3)
    ax.set(yscale="log", xlabel="memorization score (share of the l tokens reproduced)",
           ylabel="share of sequences", title="score distribution per checkpoint")
    if steps:
        _step_colorbar(fig, ax, steps)
    x = np.arange(len(steps))
    bx.bar(x, [100 * s for s in shares], color=_colours(len(steps)))
    for i, s in enumerate(shares):
        bx.annotate(f"{100 * s:.1f}%", (i, 100 * s), ha="center", va="bottom", fontsize=7)
    bx.set_xticks(x, [str(s) for s in steps], rotation=90 if len(steps) > 12 else 0,
                  fontsize=7)
    bx.set(xlabel="checkpoint step", ylabel=f"{l}-extractable sequences (%)",
           title="share of score 1.0")
    return plots.save_png(fig, path)


def _chunk_table(records):
    """(chunk names in training order, {name: index}, per record {name: mean score})."""
    names = {}
    for r in records:
        for c in r["result"]["chunks"]:
            names[c["name"]] = int(c["index"])
    order = sorted(names, key=names.get)
    means = [{c["name"]: c["mean"] for c in r["result"]["chunks"] if c["sequences"]}
             for r in records]
    return order, means


def memorization_chunks(records, path):
    """Mean score per chunk group (x, training order) for each checkpoint (one line, colour
    by step); a star on each line at the group of that checkpoint's latest seen chunk."""
    order, means = _chunk_table(records)
    size = max(1, math.ceil(len(order) / MAX_CHUNK_GROUPS))
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    labels = [g[0] if len(g) == 1 else f"{g[0]}..{g[-1]}" for g in groups]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(groups) + 4), 4.8), dpi=100)
    for r, m, c in zip(records, means, _colours(len(records))):
        ys = [np.mean([m[n] for n in g if n in m]) if any(n in m for n in g) else np.nan
              for g in groups]
        ax.plot(range(len(groups)), ys, color=c, lw=1, marker=".", ms=4)
        latest = r["result"].get("latest_chunk")
        hit = [i for i, g in enumerate(groups) if latest in g]
        if hit:
            ax.plot(hit[0], ys[hit[0]], marker="*", ms=11, color=c, mec="black", mew=0.5)
    ax.set_xticks(range(len(groups)), labels, rotation=90, fontsize=7)
    ax.set(xlabel="data chunk (training order)", ylabel="mean memorization score",
           title="memorization per data chunk; star: the checkpoint's latest chunk")
    ax.grid(alpha=0.3)
    if records:
        _step_colorbar(fig, ax, _steps(records))
    return plots.save_png(fig, path)


def score_matrix(records):
    """(steps, sequence keys, scores checkpoints x sequences, NaN where not scored): every
    sequence (chunk, position in its sample) scored by any checkpoint."""
    per = []
    for r in records:
        l = int(r["result"]["l"])
        per.append({(c["name"], i): m / l for c in r["result"]["chunks"]
                    for i, m in enumerate(c["matches"])})
    keys = sorted({k for p in per for k in p})
    col = {k: j for j, k in enumerate(keys)}
    out = np.full((len(records), len(keys)), np.nan)
    for i, p in enumerate(per):
        for k, v in p.items():
            out[i, col[k]] = v
    return _steps(records), keys, out


def correlations(scores_CxN) -> np.ndarray:
    """Pearson correlation of per-sequence scores between checkpoints, over the sequences
    both scored (NaN where fewer than two or either is constant)."""
    n = scores_CxN.shape[0]
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            both = ~np.isnan(scores_CxN[i]) & ~np.isnan(scores_CxN[j])
            a, b = scores_CxN[i, both], scores_CxN[j, both]
            if both.sum() >= 2 and a.std() > 0 and b.std() > 0:
                out[i, j] = float(np.corrcoef(a, b)[0, 1])
    return out


def memorization_correlation(records, path):
    """Heatmap of `correlations` between checkpoints, labelled by step."""
    steps, _, scores = score_matrix(records)
    corr = correlations(scores)
    n = len(steps)
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * n + 3), max(4, 0.4 * n + 2)), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(corr), cmap="magma", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, label="Pearson r of per-sequence scores")
    ax.set_xticks(range(n), [str(s) for s in steps], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [str(s) for s in steps], fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if not np.isnan(corr[i, j]):
                    ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if corr[i, j] < 0.5 else "black")
    ax.set(xlabel="checkpoint step", ylabel="checkpoint step",
           title="memorization: correlation between checkpoints")
    return plots.save_png(fig, path)


def memorization_matrix(records, path):
    """The checkpoint x chunk matrix of mean scores as CSV (empty: not scored)."""
    order, means = _chunk_table(records)
    lines = [",".join(["step"] + order)]
    for step, m in zip(_steps(records), means):
        lines.append(",".join([str(step)] + [f"{m[n]:.6f}" if n in m else "" for n in order]))
    with fileio.atomic_open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
