"""Memorization as LLM360 and Pythia measure it: the sweep's `memorization` task.

A sequence's score is the share of its l tokens after a k-token prompt that greedy decoding
reproduces exactly (Biderman et al. 2023; k = l = 32 in LLM360 and Pythia); 1.0 means
"32-extractable". The sequences are the exact rows the run trained on: for every data chunk
(LLM360's: the steps of a stage between two release checkpoints, `StageLoader.chunk_of_step`)
`sequences_per_chunk` of its rows, drawn without replacement with a seed fixed by (seed,
stage, chunk), read through the training loader (FIM and quarantine as trained). A
checkpoint is scored on every chunk it has seen (and, with include_unseen, on the others
too, as a baseline). The record keeps each sequence's number of matching tokens, so the
figures can correlate scores of one sequence across checkpoints.

Outputs (redrawn each sweep, crystal.eval.figures): the checkpoint x chunk matrix of mean
scores (memorization_matrix.csv) and LLM360's three figures: the score distribution per
checkpoint with the share of 1.0, the mean score per chunk group per checkpoint with each
checkpoint's latest chunk marked, and the correlation of per-sequence scores between
checkpoints.
"""

from __future__ import annotations

import numpy as np

from crystal import config as config_lib
from crystal import fileio
from crystal.data import loader as loader_lib
from crystal.data.chunks import numbering
from crystal.data.chunks.numbering import DataChunk
from crystal.errors import DataError
from crystal.eval import figures
from crystal.eval.tasks import Result, Task

DEFAULTS = dict(k=32, l=32, sequences_per_chunk=1000, include_unseen=False, batch_size=128)


def stage_loaders(cfg, workdir) -> dict[int, loader_lib.StageLoader]:
    """The training loader of every stage (with the run's quarantine ledger): the one source
    of the rows each step trained on."""
    return {n: loader_lib.StageLoader(cfg, workdir, n)
            for n in range(1, len(config_lib.stage_names(cfg)) + 1)}


def data_chunks(cfg) -> list[DataChunk]:
    """Every data chunk of the run, in training order (crystal.data.chunks.numbering)."""
    return numbering.chunks(cfg)


def trained_rows(ld: loader_lib.StageLoader, chunk: DataChunk, n: int, seed: int,
                 length: int):
    """(record indices, tokens n' x length) of n' = min(n, rows) rows the run trained on in
    `chunk` (of `ld`'s stage), drawn without replacement by (seed, stage, chunk), in record
    order. A row is the example's input tokens and its last target: the whole trained
    sequence, of which the first `length` tokens are kept."""
    B = ld.global_batch_size
    first, count = chunk.first_step * B, (chunk.end_step - chunk.first_step) * B
    rng = np.random.default_rng([int(seed), chunk.stage, chunk.index])
    picks = np.sort(rng.choice(count, size=min(int(n), count), replace=False)) + first
    rows = []
    for g in picks:
        ex = ld.example(int(g))
        toks_T = np.concatenate([ex["inputs"], ex["targets"][-1:]])
        if toks_T.shape[0] < length:
            raise DataError(f"memorization: rows have {toks_T.shape[0]} tokens; k + l = "
                            f"{length} needed (data.seq_len + 1 >= k + l)")
        rows.append(toks_T[:length])
    return picks, np.asarray(rows, np.int32).reshape(-1, length)


def score(decoder, rows_NxT, k: int = 32, l: int = 32, batch_size: int = 128) -> np.ndarray:
    """Per row, how many of the l tokens after the k-token prompt greedy decoding
    reproduces (int, 0..l; the score is this / l)."""
    rows = np.asarray(rows_NxT, np.int32)
    if rows.shape[1] < k + l:
        raise DataError(f"memorization: rows have {rows.shape[1]} tokens; k + l = {k + l} "
                        "needed")
    out = np.zeros((rows.shape[0],), np.int32)
    for i in range(0, rows.shape[0], batch_size):
        part = rows[i:i + batch_size]
        got = decoder.generate(part[:, :k].tolist(), l, stop_at_eos=False)
        out[i:i + len(part)] = [int(np.sum(np.asarray(g.tokens) == r[k:k + l]))
                                for g, r in zip(got, part)]
    return out


def _samples(ctx, chunk: DataChunk) -> dict:
    """The chunk's sampled rows and their hashes, once per sweep."""
    s = ctx.settings
    key = ("memorization", chunk, s["k"] + s["l"], s["sequences_per_chunk"], ctx.seed)
    if key not in ctx.cache:
        picks, rows = trained_rows(_loaders(ctx)[chunk.stage], chunk,
                                   s["sequences_per_chunk"], ctx.seed, s["k"] + s["l"])
        ctx.cache[key] = dict(rows=rows, records=picks,
                              sha256=fileio.sha256_bytes(rows.tobytes()),
                              records_sha256=fileio.sha256_bytes(picks.astype(np.int64)
                                                                 .tobytes()))
    return ctx.cache[key]


def _loaders(ctx) -> dict:
    if "memorization loaders" not in ctx.cache:
        ctx.cache["memorization loaders"] = stage_loaders(ctx.cfg, ctx.workdir)
    return ctx.cache["memorization loaders"]


def evaluate(ckpt, params, cfg, ctx) -> Result:
    s = ctx.settings
    k, l = int(s["k"]), int(s["l"])
    chunks, body, seen_scores, hashes = data_chunks(ctx.cfg), [], [], {}
    latest = None
    for ch in chunks:
        seen = ch.seen_by(ckpt.stage, ckpt.stage_step)
        if not (seen or s["include_unseen"]):
            continue
        smp = _samples(ctx, ch)
        matches = score(ctx.decoder(), smp["rows"], k, l, int(s["batch_size"]))
        body.append(dict(name=ch.name, index=ch.number, stage=ch.stage, chunk=ch.index,
                         steps=[ch.first_step, ch.end_step], seen=seen,
                         sequences=int(len(matches)), rows_sha256=smp["sha256"],
                         records_sha256=smp["records_sha256"],
                         mean=float(matches.mean() / l) if len(matches) else 0.0,
                         extractable=float(np.mean(matches == l)) if len(matches) else 0.0,
                         matches=matches.tolist()))
        hashes[ch.name] = smp["sha256"]
        if seen:
            seen_scores.append(matches / l)
            latest = body[-1]
    metrics = {}
    if seen_scores:
        allv = np.concatenate(seen_scores)
        metrics = dict(mean=float(allv.mean()), extractable=float(np.mean(allv == 1.0)),
                       latest_chunk_mean=latest["mean"])
    inputs = dict(eval_set_sha256=fileio.json_sha256(hashes), chunks=hashes)
    return Result(metrics=metrics, inputs=inputs,
                  body=dict(k=k, l=l, latest_chunk=latest["name"] if latest else None,
                            chunks=body))


def summarize(records, out_dir, ctx):
    return [figures.memorization_matrix(records, out_dir / "memorization_matrix.csv"),
            figures.memorization_distribution(records, out_dir /
                                              "memorization_distribution.png"),
            figures.memorization_chunks(records, out_dir / "memorization_chunks.png"),
            figures.memorization_correlation(records, out_dir /
                                             "memorization_correlation.png")]


TASK = Task(name="memorization", doc=__doc__.split("\n\n")[0], settings=DEFAULTS,
            evaluate=evaluate, summarize=summarize)
