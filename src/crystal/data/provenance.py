"""Document provenance: which documents, and which part of each, a stored row holds.

Preparation writes each group's `documents.npy`: its documents in stream order (the
seeded shuffle) as (input file index, record, tokens, end in the stream), and
`sources.json` names the input files. A stored row r of a shard covers stream tokens
[offset + r * (seq_len + 1), offset + (r + 1) * (seq_len + 1)), `offset` being the shard's
(manifest), so the documents of any row are a binary search away: a memorised sequence
leads back to the file and record (JSON line, Parquet row) it came from (Pythia's lesson).

Spans describe the row as stored. A FIM'd row holds the same documents, rearranged
(crystal.data.fim); the exported rows carry both the trained tokens and these spans.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crystal.data import manifest as man_lib
from crystal.data import sample, sources
from crystal.errors import DataError


class Provenance:
    """Row -> document spans for one prepared workdir (tables memory-mapped on use)."""

    def __init__(self, workdir, manifest: dict | None = None):
        self.workdir = Path(workdir)
        self.manifest = manifest or man_lib.read(workdir)[0]
        self.sources = man_lib.read_sources(workdir, self.manifest)
        self.L1 = int(self.manifest["seq_len"]) + 1
        self._tables: dict[str, np.ndarray] = {}

    def table(self, group: str) -> np.ndarray:
        """The group's (documents, 4) table: file index, record, tokens, stream end."""
        t = self._tables.get(group)
        if t is None:
            e = self.manifest["groups"][group].get("documents")
            if not e:
                raise DataError(f"{man_lib.path(self.workdir)}: group {group} has no "
                                "document table; prepare the data again")
            # Memory-mapped (a group may have a billion documents), viewed as a plain array:
            # np.memmap's per-slice bookkeeping costs more than the lookup.
            t = np.load(man_lib.data_dir(self.workdir) / e["path"], mmap_mode="r",
                        allow_pickle=False).view(np.ndarray)
            self._tables[group] = t
        return t

    def offset(self, group: str, shard: int) -> int:
        """Stream position of a shard's first row (-1: the validation rows)."""
        g = self.manifest["groups"][group]
        return int((g["val"] if shard < 0 else g["shards"][shard])["offset"])

    def spans(self, group: str, shard: int, row: int) -> list[dict]:
        """The documents of stored row `row` of shard `shard` (-1: val) of `group`, in row
        order: doc (index in the group's table), file (input file), record (its line or
        row, from 1), start and end (the token range of the document the row holds; a
        document's tokens end with its EOS), tokens (the document's length)."""
        t = self.table(group)
        s = self.offset(group, shard) + int(row) * self.L1
        e = s + self.L1
        i0, i1 = np.searchsorted(t[:, man_lib.DOC_END], (s, e - 1), "right").tolist()
        out = []   # Python ints from here: a row holds a few documents, numpy calls cost more
        for k, (f, record, n, end) in enumerate(t[i0:i1 + 1].tolist(), start=i0):
            begin = end - n
            out.append(dict(doc=k, file=self.sources[f], record=record,
                            start=max(begin, s) - begin, end=min(end, e) - begin, tokens=n))
        return out

    def input_root(self, cfg=None) -> Path | None:
        """The input folder the files are relative to, if it is still there (the sample
        corpus is written out again when needed)."""
        inp = self.manifest.get("input", {})
        if inp.get("kind") == "sample":
            if inp.get("corpus_sha256") != sample.corpus_sha256():
                return None     # made from another version of the bundled corpus
            return sample.ensure_sample(cfg, max_mb=float(inp["max_mb"]))
        p = Path(inp.get("path", ""))
        return p if inp.get("path") and p.is_dir() else None

    def record(self, span: dict, cfg=None) -> dict | None:
        """The input record a span's document came from (None if its folder is gone)."""
        root = self.input_root(cfg)
        return None if root is None else sources.read_record(root / span["file"],
                                                              span["record"])
