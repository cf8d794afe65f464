"""Perplexity per data source on one fixed held-out set: the sweep's `perplexity` task.

The held-out set of a run is, for every data group of the manifest (every source of every
stage, whatever the stage's mixture), the first `rows_per_source` rows of the group's
validation split (`data/GROUP/val.npy`, which prepare cut before any training chunk), read
as the loader reads them (no FIM, the run's segment masking). It depends only on the
prepared data, so every checkpoint of the run, any stage, is measured on the same tokens and
the curves are comparable. The record holds per source: rows, tokens, mean loss (nats per
token), perplexity; the metrics are `SOURCE/loss` and `loss` (all sources' tokens pooled).
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

from crystal import fileio
from crystal import model as model_lib
from crystal.data import loader as loader_lib
from crystal.eval import figures
from crystal.eval.tasks import Result, Task
from crystal.train import step as step_lib

DEFAULTS = dict(rows_per_source=64, batch_size=16)


def heldout_set(cfg, workdir, rows_per_source: int) -> dict[str, dict]:
    """{group: batch of its held-out examples (the loader's fields) + 'sha256' of the
    rows' tokens}, for every group with a validation split, groups sorted."""
    manifest, _ = loader_lib.read_manifest(workdir)
    reader = loader_lib.ExampleReader(workdir, manifest, None, cfg.seed, 1,
                                      cfg.data.fim_spm_rate)
    out = {}
    for gi, g in enumerate(sorted(manifest["groups"])):
        val = manifest["groups"][g].get("val")
        n = min(int(rows_per_source), int(val["num_sequences"]) if val else 0)
        if n == 0:
            continue
        batch = loader_lib.collate([reader(dict(index=j, component=-1, group=gi, chunk=-1,
                                                row=j, epoch=0)) for j in range(n)])
        tokens = np.ascontiguousarray(reader.array(gi, -1)[:n])
        out[g] = dict(batch=batch, sha256=fileio.sha256_bytes(tokens.tobytes()),
                      file_sha256=val["sha256"])
    return out


def _batches(batch: dict, size: int):
    """`batch` in slices of `size` rows, the last padded with rows that count no token."""
    n = batch["inputs"].shape[0]
    for i in range(0, n, size):
        part = {k: batch[k][i:i + size] for k in ("inputs", "targets", "loss_mask",
                                                    "segment_ids")}
        pad = size - part["inputs"].shape[0]
        if pad:
            part = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                    for k, v in part.items()}
        yield part


@functools.cache
def _eval_step(spec):
    """The jitted eval step of a model shape, compiled once per process (every sweep and
    checkpoint of that shape shares it)."""
    return jax.jit(step_lib.make_eval_step(spec))


def evaluate(ckpt, params, cfg, ctx) -> Result:
    s = ctx.settings
    key = ("perplexity", s["rows_per_source"])
    if key not in ctx.cache:
        ctx.cache[key] = heldout_set(cfg, ctx.workdir, s["rows_per_source"])
    sources, eval_fn = ctx.cache[key], _eval_step(model_lib.ModelSpec.from_config(cfg))
    body, metrics, tot, cnt = {}, {}, 0.0, 0.0
    for g, src in sources.items():
        loss_sum = tokens = 0.0
        for b in _batches(src["batch"], int(s["batch_size"])):
            ls, tk = eval_fn(params, b)
            loss_sum, tokens = loss_sum + float(ls), tokens + float(tk)
        loss = loss_sum / max(tokens, 1.0)
        body[g] = dict(rows=int(src["batch"]["inputs"].shape[0]), tokens=int(tokens),
                       loss=loss, perplexity=math.exp(min(loss, 700.0)))
        metrics[f"{g}/loss"] = loss
        tot, cnt = tot + loss_sum, cnt + tokens
    metrics["loss"] = tot / max(cnt, 1.0)
    inputs = dict(eval_set_sha256=fileio.json_sha256({g: v["sha256"] for g, v in
                                                      sources.items()}),
                  sources={g: dict(rows_sha256=v["sha256"], val_file_sha256=v["file_sha256"])
                           for g, v in sources.items()})
    return Result(metrics=metrics, inputs=inputs, body=dict(sources=body))


def summarize(records, out_dir, ctx):
    return [figures.perplexity(records, out_dir / "perplexity.png")]


TASK = Task(name="perplexity", doc=__doc__.split("\n\n")[0], settings=DEFAULTS,
            evaluate=evaluate, summarize=summarize)
