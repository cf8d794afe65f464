"""The bundle's README.md: a model card written from the numbers (config, index, data
chunks), with how to verify the bundle and how to continue training from it."""

from __future__ import annotations

from pathlib import Path

from crystal import config as config_lib
from crystal import fileio, metrics
from crystal.data.chunks import files as chunk_files


def _arch(cfg) -> list[str]:
    m = cfg.model
    hd = config_lib.head_dim(cfg)
    return [
        f"- layers {m.num_layers}, d_model {m.d_model}, {m.num_heads} heads x {hd}, SwiGLU "
        f"FFN {m.ffn_dim}, vocab {m.vocab_size}, context {cfg.data.seq_len}",
        f"- {m.norm} (eps {m.norm_eps:g}), RoPE on {config_lib.rotary_dims(cfg)}/{hd} head dims "
        f"({m.rotary_pairing} pairing, base {m.rotary_base:g}), "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings, "
        + ("muP (base width {}, embedding x{:g}, output alpha {:g})".format(
            cfg.mup.base_width, cfg.mup.embedding_multiplier, cfg.mup.output_alpha)
           if cfg.mup.enabled else "standard parametrization"),
        f"- parameters: {metrics.param_count(cfg):,}",
    ]


def _stages(cfg, chunk_idx: dict) -> list[str]:
    lines = ["| stage | steps | schedule | mixture (weight) | tokens trained |",
             "|---|---|---|---|---|"]
    per_stage: dict[int, int] = {}
    for c in chunk_idx["chunks"]:
        per_stage[c["stage"]] = per_stage.get(c["stage"], 0) + int(c["num_tokens"])
    for n in range(1, len(config_lib.stage_names(cfg)) + 1):
        s = config_lib.stage(cfg, n)
        sc = s.schedule
        mix = ", ".join(f"{k} {v.weight:g}" for k, v in s.mixture.items())
        lines.append(f"| {n} | {s.steps:,} | {sc.kind}: warmup {sc.warmup_steps} to "
                     f"{sc.peak_lr:g}, towards {sc.end_lr:g} | {mix} | "
                     f"{per_stage.get(n, 0):,} |")
    return lines


def _results(idx: dict) -> list[str]:
    rows = [r for r in idx["rows"] if r.get("loss") is not None]
    if not rows:
        return ["No training loss was logged at the released steps."]
    final = rows[-1]
    best = min(rows, key=lambda r: r["loss"])
    out = [f"- final training loss {final['loss']:.4f} at step {final['step']}; lowest at a "
           f"release {best['loss']:.4f} (step {best['step']})"]
    evals = [c for c in idx["columns"] if c.count("/") == 1]   # each task's headline values
    for c in evals:
        vals = [(r["step"], r[c]) for r in idx["rows"] if r.get(c) is not None]
        if vals:
            out.append(f"- {c}: {vals[-1][1]:.4g} at step {vals[-1][0]} "
                       f"({len(vals)} checkpoints evaluated)")
    return out


def write(path: Path, r, idx: dict):
    """README.md of the bundle (run `r`, index `idx`)."""
    cfg = r.cfg
    chunk_idx = chunk_files.read_index(Path(path).parent / "data" / "chunks")
    total = sum(int(c["num_tokens"]) for c in chunk_idx["chunks"])
    steps = [row["step"] for row in idx["rows"]]
    mid = steps[len(steps) // 2] if steps else 0
    lines = [
        f"# {cfg.name}: a crystal release",
        "",
        "Every released checkpoint with its optimizer state, the exact data chunks between",
        "them, every metric, every evaluation and the run's ledger, lined up in index.csv.",
        "" if r.finished else "**Partial release**: the run had not finished.",
        "## Model", "", *_arch(cfg), "",
        "## Data and schedule", "",
        f"{len(chunk_idx['chunks'])} data chunks, {total:,} tokens "
        f"({cfg.train.global_batch_size} x {cfg.data.seq_len + 1} tokens per step).", "",
        *_stages(cfg, chunk_idx), "",
        "## Results", "", *_results(idx), "",
        "## Verify", "",
        "    cd BUNDLE && sha256sum -c MANIFEST.sha256              # every file, no crystal",
        "    python -m crystal.release.verify BUNDLE --replay=2     # hashes, index, ledger,",
        "                                                          # chunks, replayed steps", "",
        "## Continue training", "",
        "    python -m crystal.train --config=BUNDLE/config/config.json --workdir=NEW \\",
        f"        --init_from=BUNDLE/checkpoints/{mid} --stage=N",
        "", "The new run records this bundle's id and the step in its ledger.", "",
        "## Files", "",
        "checkpoints/ (orbax, full state), data/chunks/ (one JSON lines file per data chunk,",
        "chunks.json, tokenizer.model), metrics/, evals/, config/ (crystal config, Cerebras",
        "params.yaml per stage, code commits, packages), ledger.json, certificates/, index.json,",
        "index.csv, MANIFEST.sha256 (its sha256 is the bundle id); docs/release.md in crystal.",
    ]
    if idx.get("notes"):
        lines += ["", "## Not included", ""] + [f"- {n}" for n in idx["notes"]]
    with fileio.atomic_open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
