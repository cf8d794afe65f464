"""Exact batch replay: the tokens of any training step, from config + manifest + seed alone.

    python -m crystal.data.replay --workdir=DIR --stage=S --step=N [--out=batch.npz] [--decode]
        [--explain [--row=R]]

Global batch N of stage S is records [N*B, (N+1)*B) of the stage's mixture index
(crystal.data.mixture), so replay is indexing: no training state, no earlier batch is read.
The training loader computes its batches with the same `StageLoader.global_batch` path, so
the two cannot disagree. Shards quarantined during the run are read from
WORKDIR/skipped_shards.json. The config is `--config` if given, else the one the run recorded
(run.json, else the one preparation logged), with any `--config.X=V` overrides.
`--explain` traces each row (or row R) to its documents: the input file and record of each,
and which of its tokens the row holds (crystal.data.provenance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crystal import config as cfg_lib
from crystal import cli, fileio
from crystal.data import loader as loader_lib
from crystal.data import manifest as man_lib
from crystal.data import prepare as prep_lib
from crystal.data.provenance import Provenance
from crystal.data.tokenizer import Tokenizer
from crystal.errors import DataError


def replay_batch(cfg, workdir, stage: int, step: int, skip_shards=()) -> dict:
    """Global batch `step` of `stage`: the arrays the loader yields (all B rows, as one
    process sees them), plus provenance (group/shard/row/epoch/index per row)."""
    ld = loader_lib.StageLoader(cfg, workdir, stage, skip_shards=skip_shards)
    return ld.global_batch(int(step))


def run_config(workdir, config_file: str | None = None, overrides: dict | None = None):
    """The config replay uses: `config_file` if given, else the one crystal.train recorded
    in WORKDIR/run.json, else the one crystal.data.prepare logged in
    WORKDIR/data/prepare_log.json; then the dotted overrides."""
    if config_file:
        return cfg_lib.load(config_file, overrides)
    for rec_file in (Path(workdir) / "run.json",
                     man_lib.data_dir(workdir) / prep_lib.LOG_FILE):
        if rec_file.exists():
            rec = fileio.read_json(rec_file, DataError)
            if "config" not in rec:
                raise DataError(f"{rec_file}: no recorded config; pass --config")
            return cfg_lib.with_overrides(cfg_lib.from_json_dict(rec["config"], str(rec_file)),
                                          overrides)
    raise DataError(f"{workdir}: no run.json or data/{prep_lib.LOG_FILE} records a config; "
                    "pass --config")


def run_tokenizer(workdir, man: dict | None = None) -> Tokenizer:
    """The run's own tokenizer (data/tokenizer.model with the manifest's special tokens)."""
    man = man or man_lib.read(workdir)[0]
    tok = man["tokenizer"]
    return Tokenizer.load(man_lib.data_dir(workdir) / tok.get("path", man_lib.TOKENIZER_FILE),
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
        lines.append(f"row {r:4d}  index {int(batch['index'][r])}  {g}:{int(batch['shard'][r])}"
                     f"  row {int(batch['row'][r])}  epoch {int(batch['epoch'][r])}"
                     f"  fim {int(batch['fim'][r])}  tokens {int(batch['loss_mask'][r].sum())}"
                     + ("  (substituted: quarantined shard)" if batch["substituted"][r] else ""))
        if decode is not None:
            n = int(batch["loss_mask"][r].sum()) + 1
            toks = np.concatenate([batch["inputs"][r, :1], batch["targets"][r]])[:n]
            lines.append(decode(toks))
            lines.append("")
    return "\n".join(lines)


def _brief(value, width: int = 60):
    """A record's fields with long text cut, for one line."""
    if isinstance(value, dict):
        return {k: _brief(v, width) for k, v in value.items()}
    if isinstance(value, str) and len(value) > width:
        return f"{value[:width]!r}... ({len(value)} chars)"
    return value


def explain(batch: dict, group_names, prov: Provenance, rows, cfg=None) -> str:
    """Each row's documents: the input file and record of each, the token range of the
    document the stored row holds, and the record's fields (text cut short)."""
    lines = []
    for r in rows:
        g, shard, row = (group_names[int(batch["group"][r])], int(batch["shard"][r]),
                         int(batch["row"][r]))
        lines.append(f"row {r:4d}  {g}:{shard}  row {row}" + (
            f"  (FIM rearranged {int(batch['fim'][r])} of these documents)"
            if batch["fim"][r] else ""))
        for sp in prov.spans(g, shard, row):
            lines.append(f"  doc {sp['doc']}  tokens [{sp['start']}, {sp['end']}) of "
                         f"{sp['tokens']}  {sp['file']} record {sp['record']}")
            rec = prov.record(sp, cfg)
            if rec is not None:
                lines.append(f"    {_brief(rec)}")
    return "\n".join(lines)


FLAGS = (
    cli.Flag("workdir", "run directory holding data/manifest.json", required=True),
    cli.Flag("stage", "stage number (1-based)", int, required=True),
    cli.Flag("step", "step within the stage (0-based)", int, required=True),
    cli.Flag("out", "write the batch to this .npz", str, ""),
    cli.Flag("decode", "print each row's text", bool, False),
    cli.Flag("explain", "trace each row to its documents (input file, record, tokens)",
             bool, False),
    cli.Flag("row", "with --explain: only this row of the batch", int, -1),
)


def main(argv=None):
    def body(a):
        cfg = a.cfg or run_config(a.workdir, overrides=a.overrides)
        batch = replay_batch(cfg, a.workdir, a.stage, a.step)
        man, sha = man_lib.read(a.workdir)
        names = man_lib.group_names(man)
        B = batch["inputs"].shape[0]
        print(f"stage {a.stage} step {a.step}: {B} rows x "
              f"{batch['inputs'].shape[1]} tokens; data {sha[:16]}")
        if a.explain:
            if not -1 <= a.row < B:
                raise DataError(f"--row={a.row}: the batch has rows 0..{B - 1}")
            rows = range(B) if a.row < 0 else [a.row]
            print(explain(batch, names, Provenance(a.workdir, man), rows, cfg))
        else:
            print(describe(batch, names, decoder(a.workdir) if a.decode else None))
        if a.out:
            save_npz(a.out, batch, names)
            print(f"wrote {a.out}")
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_OPTIONAL,
            argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
