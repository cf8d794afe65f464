"""Data-chunk export: each chunk's rows exactly as trained, in step order (files.py format).

A chunk's rows are the global batches of its steps, computed by the loader's replay
(`StageLoader.rows`: the rows the training iterator's batches stack) from the prepared
workdir, the run's config and seed, and the quarantine ledger: nothing else is read, so an
export is bit-identical whenever it is rebuilt, and rows a quarantine replaced appear as the
rows that were trained in their place (`substituted` = 1). Each row carries its provenance:
the stored row it came from and the documents it holds (crystal.data.provenance).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import shutil
import sys
import warnings
from pathlib import Path


from crystal import config as config_lib
from crystal import fileio
from crystal.data import loader as loader_lib
from crystal.data import manifest as man_lib
from crystal.data.chunks import files, numbering
from crystal.data.provenance import Provenance

CREATED_BY = "crystal.data.chunks"
WRITE_ROWS = 256    # rows per write (one write per row costs a tenth of the export)


class _Hashing:
    """A binary file that hashes what is written to it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes):
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)


def _rows(ld: loader_lib.StageLoader, chunk: numbering.DataChunk, prov: Provenance):
    """The rows of a chunk's steps, in step and batch order: the loader's rows (what its
    batches stack), computed one after the other."""
    B, names = ld.global_batch_size, ld.group_names
    L = int(prov.L1) - 1
    for rec, tokens, num_valid, num_fim in ld.rows(chunk.first_step * B, chunk.end_step * B):
        name, shard, row = names[rec["group"]], rec["shard"], rec["row"]
        g = rec["index"]
        yield dict(token_ids=tokens, source=name, loss_tokens=loader_lib.loss_tokens(
                       num_valid, L), stage=chunk.stage,
                   step=g // B, position=g % B, index=g, shard=man_lib.shard_name(name, shard),
                   row=row, epoch=rec["epoch"], fim=num_fim, substituted=rec["substituted"],
                   documents=prov.spans(name, shard, row))


def write_chunk(ld, chunk: numbering.DataChunk, prov: Provenance, out: Path,
                step_offset: int) -> dict:
    """Writes one data chunk's file; its index entry."""
    L1 = int(prov.L1)
    per_source: dict[str, int] = {}
    per_shard: dict[str, int] = {}
    rows = loss_tokens = fim_rows = substituted = 0
    with fileio.atomic_open(out / chunk.file) as raw:
        f, lines = _Hashing(raw), []
        for r in _rows(ld, chunk, prov):
            lines.append(files.row_line(r, L1 - 1))
            if len(lines) == WRITE_ROWS:
                f.write(b"".join(lines))
                lines.clear()
            per_source[r["source"]] = per_source.get(r["source"], 0) + L1
            per_shard[r["shard"]] = per_shard.get(r["shard"], 0) + 1
            rows += 1
            loss_tokens += r["loss_tokens"]
            fim_rows += r["fim"] > 0
            substituted += r["substituted"]
        f.write(b"".join(lines))
    return dict(chunk=chunk.number, stage=chunk.stage, index=chunk.index, path=chunk.file,
                sha256=f.h.hexdigest(), bytes=f.n, steps=[chunk.first_step, chunk.end_step],
                checkpoint_step=step_offset + chunk.end_step, num_rows=rows,
                num_tokens=rows * L1, num_loss_tokens=int(loss_tokens),
                fim_rows=int(fim_rows), substituted_rows=int(substituted),
                tokens_per_source=dict(sorted(per_source.items())),
                rows_per_shard=dict(sorted(per_shard.items())))


# What forked workers inherit: the loaders, the provenance and the output folder.
_STATE: dict = {}


def _write_job(chunk: numbering.DataChunk) -> dict:
    st = _STATE
    return write_chunk(st["loaders"][chunk.stage], chunk, st["prov"], st["out"],
                       st["offsets"][chunk.stage])


def _map_chunks(selected, workers: int) -> list[dict]:
    """write_chunk over the chunks, in order; over `workers` forked processes on Linux.

    Fork, not spawn: a worker needs the loader (grain, which imports jax: seconds to start)
    and gets it, built, for free. The workers run no JAX code, so a JAX runtime in the
    parent (if any) is never touched by them; elsewhere the chunks are written in-process.
    """
    if workers <= 1 or len(selected) <= 1 or sys.platform != "linux":
        return [_write_job(c) for c in selected]
    with warnings.catch_warnings():     # JAX's at-fork warning, for a runtime we do not use
        warnings.simplefilter("ignore", RuntimeWarning)
        with mp.get_context("fork").Pool(min(workers, len(selected))) as pool:
            return pool.map(_write_job, selected, chunksize=1)


def export(cfg, workdir, out, selected: list[numbering.DataChunk], workers: int = 1) -> dict:
    """Writes the `selected` data chunks, their index and the tokenizer to `out` (a new
    folder, whole or not at all) with `workers` processes; returns the index. The bytes do
    not depend on `workers`."""
    man, sha = man_lib.read(workdir)
    stages = sorted({c.stage for c in selected})
    loaders = {s: loader_lib.StageLoader(cfg, workdir, s) for s in stages}
    with fileio.atomic_dir(out) as tmp:
        tok = man_lib.data_dir(workdir) / man["tokenizer"].get("path", man_lib.TOKENIZER_FILE)
        shutil.copyfile(tok, tmp / files.TOKENIZER)
        _STATE.update(loaders=loaders, prov=Provenance(workdir, man), out=tmp,
                      offsets={s: sum(numbering.stage_steps(cfg, i) for i in range(1, s))
                               for s in stages})
        try:
            entries = _map_chunks(selected, workers)
        finally:
            _STATE.clear()
        skips = {f"stage_{s}": [k.to_json() for k in ld.mixture.skips]
                 for s, ld in loaders.items()}
        index = dict(format=files.FORMAT, created_by=CREATED_BY, config_name=cfg.name,
                     config_fingerprint=config_lib.fingerprint(cfg), data_sha256=sha,
                     seed=int(cfg.seed), seq_len=int(man["seq_len"]),
                     global_batch_size=int(cfg.train.global_batch_size),
                     tokenizer=dict(path=files.TOKENIZER, sha256=man["tokenizer"]["sha256"],
                                    vocab_size=man["tokenizer"]["vocab_size"],
                                    special_tokens=man["tokenizer"]["special_tokens"]),
                     quarantined_shards=skips, fields=list(files.ROW_FIELDS), chunks=entries)
        fileio.write_json(tmp / files.INDEX, index)
    return index
