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


def heldout_set(cfg, workdir, rows_per_source: int) -> dict:
    """The held-out set: {'sources': [group, ...] (sorted, those with a validation split),
    'batch': every source's rows, in that order, as the loader's fields with `source_id` the
    source's index, 'sha256': {group: hash of its rows' tokens}, 'files': {group: its
    val.npy's sha256 from the manifest}}."""
    manifest, _ = loader_lib.read_manifest(workdir)
    reader = loader_lib.ExampleReader(workdir, manifest, None, cfg.seed, 1,
                                      cfg.data.fim_spm_rate)
    sources, examples, sha, files = [], [], {}, {}
    for gi, g in enumerate(sorted(manifest["groups"])):
        val = manifest["groups"][g].get("val")
        n = min(int(rows_per_source), int(val["num_sequences"]) if val else 0)
        if n == 0:
            continue
        examples += [dict(reader(dict(index=j, component=-1, group=gi, shard=-1, row=j,
                                      epoch=0)), source_id=len(sources)) for j in range(n)]
        sha[g] = fileio.sha256_bytes(np.ascontiguousarray(reader.array(gi, -1)[:n]).tobytes())
        files[g] = val["sha256"]
        sources.append(g)
    return dict(sources=sources, batch=loader_lib.collate(examples), sha256=sha, files=files)


def _batches(batch: dict, size: int):
    """`batch` in slices of `size` rows, the last padded with rows that count no token."""
    n = batch["inputs"].shape[0]
    for i in range(0, n, size):
        part = {k: batch[k][i:i + size] for k in ("inputs", "targets", "loss_mask",
                                                    "segment_ids", "source_id")}
        pad = size - part["inputs"].shape[0]
        if pad:
            part = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                    for k, v in part.items()}
        yield part


@functools.cache
def _source_sums(spec, num_sources: int):
    """Jitted (params, batch) -> (loss sum, token count) per source: the training loss's
    own per-source sums (train.step.loss_sums), compiled once per process and shape."""
    def sums(params, batch):
        _, aux = step_lib.loss_sums(params, batch, spec, num_sources)
        return aux["source_loss"], aux["source_tokens"]
    return jax.jit(sums)


def evaluate(ckpt, params, cfg, ctx) -> Result:
    s = ctx.settings
    key = ("perplexity", s["rows_per_source"])
    if key not in ctx.cache:
        ctx.cache[key] = heldout_set(cfg, ctx.workdir, s["rows_per_source"])
    held = ctx.cache[key]
    n = len(held["sources"])
    fn = _source_sums(model_lib.ModelSpec.from_config(cfg), n)
    loss_S, tokens_S = np.zeros(n), np.zeros(n)
    for b in _batches(held["batch"], int(s["batch_size"])):
        ls, tk = jax.device_get(fn(params, b))
        loss_S, tokens_S = loss_S + ls, tokens_S + tk
    body, metrics = {}, {}
    for i, g in enumerate(held["sources"]):
        loss = float(loss_S[i] / max(tokens_S[i], 1.0))
        body[g] = dict(rows=int(np.sum(held["batch"]["source_id"] == i)),
                       tokens=int(tokens_S[i]), loss=loss,
                       perplexity=math.exp(min(loss, 700.0)))
        metrics[f"{g}/loss"] = loss
    metrics["loss"] = float(loss_S.sum() / max(tokens_S.sum(), 1.0))
    inputs = dict(eval_set_sha256=fileio.json_sha256(held["sha256"]),
                  sources={g: dict(rows_sha256=held["sha256"][g],
                                   val_file_sha256=held["files"][g]) for g in held["sources"]})
    return Result(metrics=metrics, inputs=inputs, body=dict(sources=body))


def summarize(records, out_dir, ctx):
    return [figures.perplexity(records, out_dir / "perplexity.png")]


TASK = Task(name="perplexity", doc=__doc__.split("\n\n")[0], settings=DEFAULTS,
            evaluate=evaluate, summarize=summarize)
