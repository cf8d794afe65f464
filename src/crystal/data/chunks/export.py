"""Data-chunk export: each chunk's rows exactly as trained, in step order (files.py format).

A chunk's rows are the global batches of its steps, computed by the loader's replay
(`StageLoader.global_batches`, the dataset the training iterator slices) from the prepared
workdir, the run's config and seed, and the quarantine ledger: nothing else is read, so an
export is bit-identical whenever it is rebuilt, and rows a quarantine replaced appear as the
rows that were trained in their place (`substituted` = 1). Each row carries its provenance:
the stored row it came from and the documents it holds (crystal.data.provenance).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import grain
import numpy as np

from crystal import config as config_lib
from crystal import fileio
from crystal.data import loader as loader_lib
from crystal.data import manifest as man_lib
from crystal.data.chunks import files, numbering
from crystal.data.provenance import Provenance

CREATED_BY = "crystal.data.chunks"


class _Hashing:
    """A binary file that hashes what is written to it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes):
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)


def _rows(batch: dict, step: int, stage: int, names, prov: Provenance):
    """The JSON rows of one global batch, in batch order."""
    tokens_BxT = np.concatenate([batch["inputs"][:, :1], batch["targets"]], 1)
    mask_BxL = batch["loss_mask"].astype(np.int8)
    for p in range(tokens_BxT.shape[0]):
        g, shard, row = names[int(batch["group"][p])], int(batch["shard"][p]), \
            int(batch["row"][p])
        spans = prov.spans(g, shard, row)
        yield dict(token_ids=tokens_BxT[p].tolist(), source=g, loss_mask=mask_BxL[p].tolist(),
                   stage=stage, step=step, position=p, index=int(batch["index"][p]),
                   shard=man_lib.shard_name(g, shard), row=row, epoch=int(batch["epoch"][p]),
                   fim=int(batch["fim"][p]), substituted=int(batch["substituted"][p]),
                   documents=[{k: s[k] for k in ("doc", "file", "record", "start", "end")}
                              for s in spans])


def _batches(ld: loader_lib.StageLoader, first: int, end: int, threads: int):
    """Global batches first..end-1, computed by `threads` grain reader threads."""
    ds = ld.global_batches()[first:end].to_iter_dataset(grain.ReadOptions(
        num_threads=max(1, threads), prefetch_buffer_size=max(2, threads)))
    return iter(ds)


def write_chunk(ld, chunk: numbering.DataChunk, prov: Provenance, out: Path,
                threads: int, step_offset: int) -> dict:
    """Writes one data chunk's file; its index entry."""
    names, L1 = ld.group_names, int(prov.L1)
    per_source: dict[str, int] = {}
    per_shard: dict[str, int] = {}
    rows = loss_tokens = fim_rows = substituted = 0
    with fileio.atomic_open(out / chunk.file) as raw:
        f = _Hashing(raw)
        for step, batch in zip(range(chunk.first_step, chunk.end_step),
                               _batches(ld, chunk.first_step, chunk.end_step, threads)):
            for r in _rows(batch, step, chunk.stage, names, prov):
                f.write(files.row_line(r))
                per_source[r["source"]] = per_source.get(r["source"], 0) + L1
                per_shard[r["shard"]] = per_shard.get(r["shard"], 0) + 1
                rows += 1
                loss_tokens += sum(r["loss_mask"])
                fim_rows += r["fim"] > 0
                substituted += r["substituted"]
    return dict(chunk=chunk.number, stage=chunk.stage, index=chunk.index, path=chunk.file,
                sha256=f.h.hexdigest(), bytes=f.n, steps=[chunk.first_step, chunk.end_step],
                checkpoint_step=step_offset + chunk.end_step, num_rows=rows,
                num_tokens=rows * L1, num_loss_tokens=int(loss_tokens),
                fim_rows=int(fim_rows), substituted_rows=int(substituted),
                tokens_per_source=dict(sorted(per_source.items())),
                rows_per_shard=dict(sorted(per_shard.items())))


def export(cfg, workdir, out, selected: list[numbering.DataChunk], threads: int = 2) -> dict:
    """Writes the `selected` data chunks, their index and the tokenizer to `out` (a new
    folder, whole or not at all); returns the index."""
    man, sha = man_lib.read(workdir)
    prov = Provenance(workdir, man)
    offsets = {s: sum(numbering.stage_steps(cfg, i) for i in range(1, s))
               for s in {c.stage for c in selected}}
    with fileio.atomic_dir(out) as tmp:
        tok = man_lib.data_dir(workdir) / man["tokenizer"].get("path", man_lib.TOKENIZER_FILE)
        shutil.copyfile(tok, tmp / files.TOKENIZER)
        entries, skips = [], {}
        for stage in sorted(offsets):
            ld = loader_lib.StageLoader(cfg, workdir, stage)
            skips[f"stage_{stage}"] = [s.to_json() for s in ld.mixture.skips]
            for c in (c for c in selected if c.stage == stage):
                entries.append(write_chunk(ld, c, prov, tmp, threads, offsets[stage]))
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
