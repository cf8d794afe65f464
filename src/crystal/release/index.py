"""index.json and index.csv: the one table that lines up checkpoint <-> data chunk <->
metrics <-> evals (OLMo-style `step,stage,data_chunk,checkpoint,tokens_seen,loss,eval...`).

One row per released checkpoint: its global step, stage and stage step, the data chunk it
ends (LLM360: chunk i is trained between checkpoints i-1 and i) and that chunk's file,
tokens seen, the training loss logged at that step, every eval record of that checkpoint
(one column per task metric), and its replay certificate.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from crystal import config as config_lib
from crystal import fileio
from crystal.eval import records
from crystal.metrics import writers

FORMAT = 1
COLUMNS = ("step", "stage", "stage_step", "data_chunk", "checkpoint", "chunk_file",
           "tokens_seen", "loss", "certificate")


def eval_values(workdir) -> dict[int, dict[str, float]]:
    """{checkpoint step: {task/metric: value}} from the run's finished eval records
    (crystal.eval.records: WORKDIR/evals/TASK/SETTINGS/step_N.json, status 'ok')."""
    out: dict[int, dict[str, float]] = {}
    for p in sorted(records.evals_dir(workdir).glob("*/*/step_*.json")):
        rec = records.read(p)
        if not rec or rec.get("status") != "ok":
            continue
        row = out.setdefault(int(rec["step"]), {})
        for k, v in rec.get("metrics", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[f"{rec['task']}/{k}"] = float(v)
    return out


def build(r, certs: dict, notes: list[str]) -> dict:
    """The index of run `r` (a bundle.Run)."""
    losses = {x["step"]: x["loss"] for x in writers.read_jsonl(r.workdir / "metrics.jsonl")
              if "loss" in x}
    evals = eval_values(r.workdir)
    chunk_of = {end: num for num, end in r.chunk_end.items()}
    files = {c.number: c.file for c in r.chunks}
    rows = []
    for step in sorted(r.metas):
        m = r.metas[step]
        num = chunk_of.get(step)
        rows.append(dict(step=step, stage=int(m["stage"]), stage_step=int(m["stage_step"]),
                         data_chunk=num if num in files else None,
                         checkpoint=f"checkpoints/{step}",
                         chunk_file=f"data/chunks/{files[num]}" if num in files else None,
                         tokens_seen=int(m.get("tokens_seen", 0)), loss=losses.get(step),
                         certificate=f"certificates/{step}.json" if step in certs else None,
                         **evals.get(step, {})))
    eval_cols = sorted({k for row in rows for k in row} - set(COLUMNS))
    stages = [dict(stage=s, steps=int(config_lib.stage(r.cfg, s).steps))
              for s in range(1, len(config_lib.stage_names(r.cfg)) + 1)]
    return dict(format=FORMAT, config_name=r.cfg.name,
                config_fingerprint=config_lib.fingerprint(r.cfg), finished=r.finished,
                latest_step=r.latest, stages=stages,
                chunks=[dict(number=c.number, stage=c.stage, index=c.index,
                             steps=[c.first_step, c.end_step],
                             checkpoint_step=r.chunk_end[c.number], file=f"data/chunks/{c.file}")
                        for c in r.chunks],
                columns=list(COLUMNS) + eval_cols, rows=rows, notes=notes)


def write(root: Path, idx: dict):
    fileio.write_json(root / "index.json", idx)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(idx["columns"])
    for row in idx["rows"]:
        w.writerow([_cell(row.get(c)) for c in idx["columns"]])
    with fileio.atomic_open(root / "index.csv", "w") as f:
        f.write(buf.getvalue())


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "" if v is None else str(v)
    return repr(v) if isinstance(v, float) else str(v)
