"""Exact batch replay: the tokens of any training step, from config + manifest + seed alone.

    python -m crystal.data.replay --workdir=DIR --stage=S --step=N [--out=batch.npz] [--decode]

Global batch N of stage S is records [N*B, (N+1)*B) of the stage's mixture index
(crystal.data.mixture), so replay is indexing: no training state, no earlier batch is read.
The training loader computes its batches with the same `StageLoader.global_batch` path, so
the two cannot disagree. Chunks quarantined during the run are read from
WORKDIR/skipped_chunks.json. The config is `--config` if given, else the one the run recorded
(run.json, else the manifest), with any `--config.X=V` overrides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crystal import config as cfg_lib
from crystal import cli, fileio
from crystal.errors import DataError
from crystal.data import loader as loader_lib


def replay_batch(cfg, workdir, stage: int, step: int, skip_chunks=()) -> dict:
    """Global batch `step` of `stage`: the arrays the loader yields (all B rows, as one
    process sees them), plus provenance (group/chunk/row/epoch/index per row)."""
    ld = loader_lib.StageLoader(cfg, workdir, stage, skip_chunks=skip_chunks)
    return ld.global_batch(int(step))


def run_config(workdir, config_file: str | None = None, overrides: dict | None = None):
    """The config replay uses: `config_file` if given, else the one crystal.train recorded
    in WORKDIR/run.json, else the one crystal.data.prepare recorded in the manifest; then
    the dotted overrides."""
    if config_file:
        return cfg_lib.load(config_file, overrides)
    run_file = Path(workdir) / "run.json"
    if run_file.exists():
        rec = fileio.read_json(run_file, DataError)
        return cfg_lib.with_overrides(cfg_lib.from_json_dict(rec["config"], str(run_file)),
                                      overrides)
    man, _ = loader_lib.read_manifest(workdir)
    where = loader_lib.data_dir(workdir) / "manifest.json"
    if "config" not in man:
        raise DataError(f"{where}: no recorded config; pass --config")
    return cfg_lib.with_overrides(cfg_lib.from_json_dict(man["config"], str(where)), overrides)


def run_tokenizer(workdir):
    """The run's own tokenizer (data/tokenizer.model with the manifest's special tokens)."""
    from crystal.data.tokenizer import Tokenizer
    man, _ = loader_lib.read_manifest(workdir)
    tok = man["tokenizer"]
    return Tokenizer.load(loader_lib.data_dir(workdir) / tok.get("path", "tokenizer.model"),
                          tuple(tok.get("special_tokens", ())))


def decoder(workdir):
    """ids -> text with special tokens spelled out, by the run's own tokenizer."""
    return run_tokenizer(workdir).decode


def save_npz(path, batch: dict, group_names):
    with fileio.atomic_open(path) as f:
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


FLAGS = (
    cli.Flag("workdir", "run directory holding data/manifest.json", required=True),
    cli.Flag("stage", "stage number (1-based)", int, required=True),
    cli.Flag("step", "step within the stage (0-based)", int, required=True),
    cli.Flag("out", "write the batch to this .npz", str, ""),
    cli.Flag("decode", "print each row's text", bool, False),
)


def main(argv=None):
    def body(a):
        cfg = a.cfg or run_config(a.workdir, overrides=a.overrides)
        batch = replay_batch(cfg, a.workdir, a.stage, a.step)
        man, sha = loader_lib.read_manifest(a.workdir)
        names = sorted(man["groups"])
        print(f"stage {a.stage} step {a.step}: {batch['inputs'].shape[0]} rows x "
              f"{batch['inputs'].shape[1]} tokens; data {sha[:16]}")
        print(describe(batch, names, decoder(a.workdir) if a.decode else None))
        if a.out:
            save_npz(a.out, batch, names)
            print(f"wrote {a.out}")
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_OPTIONAL,
            argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
