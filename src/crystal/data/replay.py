"""Exact batch replay: the tokens of any training step, from config + manifest + seed alone.

    python -m crystal.data.replay --workdir=DIR --stage=S --step=N [--out=batch.npz] [--decode]

Global batch N of stage S is records [N*B, (N+1)*B) of the stage's mixture index
(crystal.data.mixture), so replay is indexing: no training state, no earlier batch is read.
The training loader computes its batches with the same `StageLoader.global_batch` path, so
the two cannot disagree. Chunks quarantined during the run are read from
WORKDIR/skipped_chunks.json. The config is `--config` if given, else WORKDIR/config.json if
the run wrote one, else the config recorded in the manifest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from crystal import config as cfg_lib
from crystal.data import cache
from crystal.data import loader as loader_lib


def replay_batch(cfg, workdir, stage: int, step: int, skip_chunks=()) -> dict:
    """Global batch `step` of `stage`: the arrays the loader yields (all B rows, as one
    process sees them), plus provenance (group/chunk/row/epoch/index per row)."""
    ld = loader_lib.StageLoader(cfg, workdir, stage, skip_chunks=skip_chunks)
    return ld.global_batch(int(step))


def run_config(workdir, config_file: str | None = None):
    """The config replay uses (see the module docstring)."""
    if config_file:
        return cfg_lib.load(config_file)
    p = Path(workdir) / "config.json"
    if p.exists():
        return cfg_lib.validate(cfg_lib.from_json_dict(json.loads(p.read_text())))
    p = Path(workdir) / "run.json"   # written by crystal.train
    if p.exists():
        return cfg_lib.validate(cfg_lib.from_json_dict(json.loads(p.read_text())["config"]))
    man, _ = loader_lib.read_manifest(workdir)
    if "config" not in man:
        raise loader_lib.LoaderError(f"{loader_lib.data_dir(workdir) / 'manifest.json'}: "
                                     "no recorded config; pass --config")
    return cfg_lib.validate(cfg_lib.from_json_dict(man["config"]))


def decoder(workdir):
    """ids -> text with special tokens spelled out, by the run's own tokenizer."""
    from crystal.data.tokenizer import Tokenizer
    man, _ = loader_lib.read_manifest(workdir)
    tok = man["tokenizer"]
    return Tokenizer.load(loader_lib.data_dir(workdir) / tok.get("path", "tokenizer.model"),
                          tuple(tok.get("special_tokens", ()))).decode


def save_npz(path, batch: dict, group_names):
    with cache.atomic_open(path) as f:
        np.savez(f, **batch, group_names=np.asarray(group_names, dtype=np.str_))


def describe(batch: dict, group_names, decode=None) -> str:
    lines = []
    for r in range(batch["inputs"].shape[0]):
        g = group_names[int(batch["group"][r])]
        lines.append(f"row {r:4d}  index {int(batch['index'][r])}  {g}:{int(batch['chunk'][r])}"
                     f"  row {int(batch['row'][r])}  epoch {int(batch['epoch'][r])}"
                     f"  fim {int(batch['fim'][r])}  tokens {int(batch['loss_mask'][r].sum())}"
                     + ("  (substituted: quarantined chunk)" if batch["substituted"][r] else ""))
        if decode is not None:
            n = int(batch["loss_mask"][r].sum()) + 1
            toks = np.concatenate([batch["inputs"][r, :1], batch["targets"][r]])[:n]
            lines.append(decode(toks))
            lines.append("")
    return "\n".join(lines)


def main(argv=None):
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Run directory holding data/manifest.json.")
    flags.DEFINE_integer("stage", None, "Stage number (1-based).")
    flags.DEFINE_integer("step", None, "Step within the stage (0-based).")
    flags.DEFINE_string("out", "", "Write the batch to this .npz.")
    flags.DEFINE_bool("decode", False, "Print each row's text.")
    flags.DEFINE_string("config", "", "Config file (default: the run's recorded config).")
    flags.mark_flags_as_required(["workdir", "stage", "step"])
    FLAGS = flags.FLAGS

    def _main(_):
        try:
            cfg = run_config(FLAGS.workdir, FLAGS.config or None)
            batch = replay_batch(cfg, FLAGS.workdir, FLAGS.stage, FLAGS.step)
            man, sha = loader_lib.read_manifest(FLAGS.workdir)
            names = sorted(man["groups"])
            print(f"stage {FLAGS.stage} step {FLAGS.step}: {batch['inputs'].shape[0]} rows x "
                  f"{batch['inputs'].shape[1]} tokens; data {sha[:16]}")
            print(describe(batch, names, decoder(FLAGS.workdir) if FLAGS.decode else None))
            if FLAGS.out:
                save_npz(FLAGS.out, batch, names)
                print(f"wrote {FLAGS.out}")
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(_main, argv=argv, flags_parser=cfg_lib.parse_flags)


if __name__ == "__main__":
    main()
