"""Source files -> numbered, hashed shards of packed rows per data group (docs/data_format.md).

Four steps, each a pure function of plain-dict jobs, so the local process pool here and the
Beam pipeline in crystal.data.beam run exactly the same code and write the same bytes:

1. `tokenize_shard`: one source shard -> per-group token files (EOS after every document,
   no BOS) and document lengths, plus its bad-record counts.
2. `plan_group`: one group's documents, in shard order, get a seeded global shuffle and
   are concatenated; the stream is cut into rows of seq_len + 1, the first rows are the
   validation split, the rest go in order into `data.num_shards` contiguous shards. The
   shuffled document table (source file, record, tokens) is the group's
   `documents.npy`, which traces any row back to its documents.
3. `write_shard`: one shard (or val) of the plan, gathered from the token files, written
   under a temporary name and renamed.
4. `finish`: the manifest, written last and atomically.

Nothing depends on how many processes run the steps: source shards are independent, plans
are built from shard-ordered parts, output shards from the plan.

    python -m crystal.data.prepare --config=configs/crystalcoder_tiny.py --workdir=DIR \
        [--input=SOURCE_DIR] [--workers=N] [--on_bad_record=skip]
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import importlib
import logging
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from crystal import __version__
from crystal import cli, fileio
from crystal import config as config_lib
from crystal.data.chunks import files as chunk_files
from crystal.data import manifest as man_lib
from crystal.data import sample
from crystal.data import sources as src_lib
from crystal.data import tokenizer as tok_lib
from crystal.data.manifest import DOCUMENTS_FILE, TOKENIZER_FILE, data_dir
from crystal.data.sources import BadRecords, DataError, Shard
from crystal.data.tokenizer import EOS_ID, Tokenizer

log = logging.getLogger(__name__)

MANIFEST = man_lib.FILE
TMP_DIR = ".prepare-tmp"
LOG_FILE = "prepare_log.json"


class DataMismatchError(DataError):
    """The workdir holds data prepared with another data/tokenizer config."""


def token_dtype(cfg) -> str:
    return "uint16" if cfg.model.vocab_size <= 1 << 16 else "int32"


# ----------------------------------------------------------------------------- identity


def input_identity(cfg, input_dir=None) -> dict:
    """What names the source corpus in the manifest (for the bundled sample: the corpus
    file's hash and size, nothing of the machine)."""
    given = input_dir or cfg.data.input
    if given:
        return dict(kind="dir", path=str(Path(given).resolve()))
    return dict(kind="sample", corpus_sha256=sample.corpus_sha256(),
                max_mb=float(cfg.data.sample_max_mb))


def data_identity(cfg, input_dir=None) -> dict:
    """Every setting that changes the prepared bytes; ensure_prepared compares these."""
    d, t = cfg.data, cfg.tokenizer
    return dict(
        seed=int(cfg.seed), input=input_identity(cfg, input_dir), seq_len=int(d.seq_len),
        num_shards=int(d.num_shards), val_fraction=float(d.val_fraction),
        min_val_sequences=int(d.min_val_sequences), dtype=token_dtype(cfg),
        tokenizer=dict(vocab_size=int(t.vocab_size), model_path=str(t.model_path),
                       special_tokens=list(t.special_tokens),
                       train_max_sentences=int(t.train_max_sentences),
                       character_coverage=float(t.character_coverage)),
    )


def _diff(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out




# ----------------------------------------------------------------------------- step 1


_TOKENIZERS: dict = {}


def _tokenizer(path: str, sha256: str) -> Tokenizer:
    """One Tokenizer per (path, content) and process; a rewritten file is never stale."""
    tok = _TOKENIZERS.get((path, sha256))
    if tok is None:
        tok = Tokenizer.load(path)
        if tok.sha256 != sha256:
            raise DataError(f"{path}: tokenizer changed during preparation (sha256 "
                            f"{tok.sha256}, expected {sha256})")
        _TOKENIZERS[(path, sha256)] = tok
    return tok


def shard_job(shard: Shard, tok: Tokenizer, tmp, dtype, on_bad_record, seq_len) -> dict:
    return dict(shard=dict(index=shard.index, kind=shard.kind, paths=list(shard.paths),
                           relpaths=list(shard.relpaths), group=shard.group,
                           parity=shard.parity, first_file=shard.first_file),
                tokenizer=str(tok.path), tokenizer_sha256=tok.sha256,
                special_tokens=list(tok.special_tokens), tmp=str(tmp), dtype=dtype,
                on_bad_record=on_bad_record, seq_len=int(seq_len))


def tokenize_shard(job: dict) -> dict:
    """Step 1: a shard's documents -> `tmp/tokens/<shard>.<group>.{tokens,lens,docs}.npy`
    (docs: each document's input file index and record, for provenance)."""
    t0 = time.perf_counter()
    s = job["shard"]
    shard = Shard(s["index"], s["kind"], tuple(s["paths"]), tuple(s["relpaths"]), s["group"],
                  s["parity"], s["first_file"])
    tok = _tokenizer(job["tokenizer"], job["tokenizer_sha256"])
    bad = BadRecords(job["on_bad_record"])
    per_group: dict[str, tuple[list, list, list]] = {}
    nbytes = 0
    for i, docs in enumerate(src_lib.iter_files(shard, bad)):
        if not docs:
            continue
        if shard.kind != src_lib.TOKENS:
            nbytes += sum(len(t.encode("utf-8")) for _, t, _ in docs)
        for group, a, record in _encode(shard, i, docs, tok, job, bad):
            arrs, lens, recs = per_group.setdefault(group, ([], [], []))
            arrs.append(a)
            lens.append(len(a))
            recs.append((shard.first_file + i, record))
    out_dir = Path(job["tmp"]) / "tokens"
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = {}
    for group in sorted(per_group):
        arrs, lens, recs = per_group[group]
        base = out_dir / f"{shard.index:06d}.{group}"
        tokens = np.concatenate(arrs)
        _save(f"{base}.tokens.npy", tokens)
        _save(f"{base}.lens.npy", np.asarray(lens, np.int64))
        _save(f"{base}.docs.npy", np.asarray(recs, np.int64).reshape(-1, 2))
        groups[group] = dict(tokens=f"{base}.tokens.npy", lens=f"{base}.lens.npy",
                             docs=f"{base}.docs.npy", num_documents=len(lens),
                             num_tokens=int(tokens.size),
                             released=shard.kind == src_lib.TOKENS)
    return dict(shard=shard.index, groups=groups, bad=bad.to_json(), bytes=nbytes,
                seconds=time.perf_counter() - t0)


def _encode(shard: Shard, i: int, docs, tok: Tokenizer, job: dict, bad: BadRecords):
    """(group, tokens, record) of a file's documents: text tokenised with EOS appended;
    released rows as they are, once their length and ids are checked."""
    dtype = np.dtype(job["dtype"])
    if shard.kind != src_lib.TOKENS:
        for (group, _, record), ids in zip(docs, tok.encode_batch([t for _, t, _ in docs])):
            a = np.empty(len(ids) + 1, dtype)
            a[:-1] = ids
            a[-1] = EOS_ID
            yield group, a, record
        return
    path, rel, L1 = shard.paths[i], shard.relpaths[i], job["seq_len"] + 1
    vocab = tok.base_vocab_size + len(job["special_tokens"])
    for group, ids, record in docs:
        a = np.asarray(ids, np.int64)
        if len(a) != L1:
            bad.add(path, rel, record, "bad_field_value", f"{len(a)} token_ids; rows of "
                    f"data.seq_len + 1 = {L1} are expected")
        elif a.min() < 0 or a.max() >= vocab:
            bad.add(path, rel, record, "bad_field_value", f"token id "
                    f"{a.max() if a.max() >= vocab else a.min()} is outside the vocabulary "
                    f"0..{vocab - 1} of {Path(job['tokenizer']).name}")
        else:
            yield group, a.astype(dtype), record


def _save(path, arr):
    with fileio.atomic_open(path) as f:
        np.save(f, arr, allow_pickle=False)


# ----------------------------------------------------------------------------- step 2


def group_seed(seed: int, group: str) -> np.random.SeedSequence:
    """Each group's shuffle depends on (seed, name) only: adding a group changes no other."""
    g = int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "little")
    return np.random.SeedSequence([int(seed), g])


def plan_group(group: str, parts: list[dict], params: dict) -> dict:
    """Step 2: shuffle a group's documents, split off val, cut rows into shards.

    `parts` are the group's entries from tokenize_shard, any order (sorted by shard here);
    `params`: seed, seq_len, num_shards, val_fraction, min_val_sequences, tmp, out.
    The plan is a (documents, 4) int64 table in shuffled order: token file, start in it,
    length, end position in the shuffled stream. The group's `documents.npy` (written to
    the output) is the same order as (input file, record, length, end).
    """
    parts = sorted(parts, key=lambda p: p["shard"])
    lens = [np.load(p["lens"], allow_pickle=False) for p in parts]
    recs = np.concatenate([np.load(p["docs"], allow_pickle=False) for p in parts])
    n_docs = sum(len(x) for x in lens)
    file_id = np.concatenate([np.full(len(x), i, np.int64) for i, x in enumerate(lens)])
    start = np.concatenate([np.cumsum(x) - x for x in lens]).astype(np.int64)
    length = np.concatenate(lens).astype(np.int64)
    if any(p["released"] for p in parts) and not all(p["released"] for p in parts):
        raise DataError(f"data group {group}: both released token rows and text documents "
                        "have this name; keep them in separate inputs")
    # Released rows keep their order: they are packed rows, already shuffled.
    perm = (np.arange(n_docs) if parts[0]["released"] else
            np.random.default_rng(group_seed(params["seed"], group)).permutation(n_docs))
    ends = np.cumsum(length[perm])
    table = np.stack([file_id[perm], start[perm], length[perm], ends], 1)
    L1 = params["seq_len"] + 1
    total = int(table[-1, 3])
    rows = total // L1
    n_val = 0
    if params["val_fraction"] > 0 or params["min_val_sequences"] > 0:
        n_val = max(int(params["min_val_sequences"]), int(round(params["val_fraction"] * rows)))
    # Validation is the first n_val rows of the shuffled stream, training the rows after
    # it: nothing is lost, and at most one document straddles the boundary.
    train_start = n_val * L1
    train_rows = (total - train_start) // L1
    N = params["num_shards"]
    if train_rows < N:
        raise DataError(f"data group {group}: {total} tokens give {rows} sequences of {L1} "
                        f"tokens; {n_val} validation + at least data.num_shards={N} training "
                        "sequences are needed (add data, or lower data.num_shards / "
                        "data.seq_len / data.val_fraction)")
    val_docs = int(np.searchsorted(table[:, 3] - table[:, 2], train_start, "left"))
    plan_dir = Path(params["tmp"]) / "plans"
    plan_dir.mkdir(parents=True, exist_ok=True)
    plan_path = plan_dir / f"{group}.npy"
    _save(plan_path, table)
    documents = write_documents(Path(params["out"]), group,
                                np.stack([recs[perm, 0], recs[perm, 1], length[perm], ends], 1))
    common = dict(group=group, plan=str(plan_path), token_files=[p["tokens"] for p in parts],
                  seq_len=params["seq_len"], dtype=params["dtype"], out=params["out"])
    jobs = []
    for i in range(N):
        a, b = i * train_rows // N, (i + 1) * train_rows // N
        jobs.append(dict(common, index=i, path=man_lib.shard_path(group, i),
                         start=train_start + a * L1, end=train_start + b * L1))
    if n_val:
        jobs.append(dict(common, index=-1, path=f"{group}/val.npy", start=0, end=n_val * L1))
    dropped = total - train_start - train_rows * L1
    return dict(group=group, source=group.split(".")[0], num_documents=n_docs,
                num_tokens=total, val_documents=val_docs, dropped_tokens=int(dropped),
                documents=documents, jobs=jobs)


def write_documents(out: Path, group: str, table) -> dict:
    """A group's document table (int64 (documents, 4): input file index, record, tokens,
    end in the stream), written like a shard; its manifest entry."""
    rel = f"{group}/{DOCUMENTS_FILE}"
    (out / group).mkdir(parents=True, exist_ok=True)
    with fileio.atomic_open(out / rel, sync=True) as f:
        np.save(f, np.ascontiguousarray(table, np.int64), allow_pickle=False)
    return dict(path=rel, sha256=fileio.file_sha256(out / rel), num_documents=len(table))


# ----------------------------------------------------------------------------- step 3


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated aranges [s, s + n) for each (s, n), vectorised."""
    offs = np.cumsum(lens) - lens
    return np.repeat(starts - offs, lens) + np.arange(int(lens.sum()))


def gather(job: dict) -> np.ndarray:
    """Stream tokens [start, end) of a plan, as a flat array (the rows of one chunk)."""
    table = np.load(job["plan"], mmap_mode="r", allow_pickle=False)
    s, e = int(job["start"]), int(job["end"])
    ends = np.asarray(table[:, 3])
    i0 = int(np.searchsorted(ends, s, "right"))
    i1 = int(np.searchsorted(ends, e - 1, "right")) + 1
    t = np.asarray(table[i0:i1])
    begin = t[:, 3] - t[:, 2]
    lo, hi = np.maximum(begin, s), np.minimum(t[:, 3], e)
    src = t[:, 1] + (lo - begin)
    n = hi - lo
    dst = lo - s
    out = np.empty(e - s, np.dtype(job["dtype"]))
    for f in np.unique(t[:, 0]):
        m = t[:, 0] == f
        tokens = np.load(job["token_files"][int(f)], mmap_mode="r", allow_pickle=False)
        out[_ranges(dst[m], n[m])] = tokens[_ranges(src[m], n[m])]
    return out


def write_shard(job: dict) -> dict:
    """Step 3: one shard (or val) file, written under a temporary name, then renamed."""
    L1 = job["seq_len"] + 1
    flat = gather(job)
    path = Path(job["out"]) / job["path"]
    rows = flat.reshape(-1, L1)
    with fileio.atomic_open(path, sync=True) as f:
        np.save(f, rows, allow_pickle=False)
    return dict(group=job["group"], index=job["index"], path=job["path"],
                sha256=fileio.file_sha256(path), num_sequences=int(rows.shape[0]),
                num_tokens=int(rows.size), offset=int(job["start"]),
                tokens_per_source={job["group"]: int(rows.size)})


# ----------------------------------------------------------------------------- step 4


def base_manifest(cfg, tok: Tokenizer, input_dir, input_info: dict, sources: dict) -> dict:
    """The manifest before its groups: only what the data is, so the same inputs and data
    settings give the same bytes at any commit (the code version, the full config and the
    timings are in prepare_log.json)."""
    return dict(
        format=man_lib.FORMAT, created_by="crystal.data.prepare", seed=int(cfg.seed),
        seq_len=int(cfg.data.seq_len), dtype=token_dtype(cfg),
        num_shards=int(cfg.data.num_shards),
        tokenizer=dict(path=TOKENIZER_FILE, sha256=tok.sha256, vocab_size=tok.base_vocab_size,
                       special_tokens=list(tok.special_tokens),
                       model_vocab_size=int(cfg.model.vocab_size),
                       trained=not bool(cfg.tokenizer.model_path)),
        input=input_info, data_identity=data_identity(cfg, input_dir), documents=sources,
    )


def finish(manifest: dict, plans: list[dict], written: list[dict], shard_results: list[dict],
           cfg, out_dir) -> dict:
    """Step 4: assemble and atomically write the manifest (shard order, not finish order)."""
    by_group: dict = {}
    for w in written:
        by_group.setdefault(w["group"], []).append(w)
    groups = {}
    for p in sorted(plans, key=lambda p: p["group"]):
        ws = sorted(by_group.get(p["group"], []), key=lambda w: w["index"])
        entry = lambda w: {k: w[k] for k in ("path", "sha256", "num_sequences",  # noqa: E731
                                             "num_tokens", "offset")}
        shards = [dict(index=w["index"], **entry(w), tokens_per_source=w["tokens_per_source"])
                  for w in ws if w["index"] >= 0]
        val = [entry(w) for w in ws if w["index"] < 0]
        if len(shards) != cfg.data.num_shards:
            raise DataError(f"data group {p['group']}: {len(shards)} shards written, "
                            f"{cfg.data.num_shards} planned")
        groups[p["group"]] = dict(
            source=p["source"], num_documents=p["num_documents"], num_tokens=p["num_tokens"],
            val_documents=p["val_documents"], dropped_tokens=p["dropped_tokens"],
            shards=shards, val=val[0] if val else None, documents=p["documents"])
    shard_results = sorted(shard_results, key=lambda r: r["shard"])
    manifest = dict(manifest, groups=groups,
                    bad_records=BadRecords.merge(r["bad"] for r in shard_results))
    man_lib.write(out_dir, manifest)
    return manifest


def unmatched_patterns(cfg, groups) -> list[str]:
    """Stage mixture components that match no prepared group (warned, logged)."""
    names = list(groups)
    return sorted(f"{s}.mixture.{c}: {comp.groups}" for s in config_lib.stage_names(cfg)
                  for c, comp in cfg.stages[s].mixture.items()
                  if not config_lib.match_groups(comp.groups, names))


def write_log(cfg, out_dir, manifest: dict, **timings):
    """prepare_log.json: how the data was made (code version, full config, timings); not
    part of the data identity."""
    g = fileio.git_commit()
    rec = dict(crystal_version=__version__, git_commit=g["commit"] or "unknown",
               git_dirty=g["dirty"], config=config_lib.to_json_dict(cfg),
               unmatched_mixture_patterns=unmatched_patterns(cfg, manifest["groups"]),
               **timings)
    fileio.write_json(Path(out_dir) / LOG_FILE, rec, sync=True)
    _warn_bad(manifest, rec["unmatched_mixture_patterns"])


# ----------------------------------------------------------------------------- driver


def resolve_input(cfg, input_dir=None) -> tuple[Path, dict]:
    """The source folder (the bundled sample, built if absent, when none is given)."""
    given = input_dir or cfg.data.input
    if given:
        p = Path(given)
        n, listing = src_lib.listing_sha256(p)
        return p, dict(kind="dir", path=str(p.resolve()), num_files=n, listing_sha256=listing)
    p = sample.ensure_sample(cfg)
    got = sample.info(p)
    # No listing of file sizes: Parquet files carry the pyarrow version that wrote them.
    return p, dict(kind="sample", corpus_sha256=got["corpus_sha256"], max_mb=got["max_mb"],
                   documents_sha256=got["documents_sha256"],
                   num_files=sum(len(s.paths) for s in src_lib.discover(p)))


def sample_root(cfg) -> Path:
    """Where the sample corpus of `cfg` is written out (built if absent)."""
    return sample.ensure_sample(cfg)


def _clear(out: Path):
    """Removes what an earlier (possibly crashed) preparation left; manifest first."""
    (out / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    if not out.exists():
        return
    for d in out.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            # train_*.npy: the shards of format 1, replaced by --overwrite
            for pat in ("shard_*.npy", "train_*.npy", "val.npy", DOCUMENTS_FILE, ".*.tmp-*"):
                for f in d.glob(pat):
                    f.unlink()
            if not any(d.iterdir()):
                d.rmdir()


def setup(cfg, workdir, input_dir=None, on_bad_record=None):
    """Shared by the local and Beam drivers: input, tokenizer, shards, base manifest."""
    on_bad = on_bad_record or cfg.data.on_bad_record
    if on_bad not in ("fail", "skip"):
        raise DataError(f"on_bad_record must be 'fail' or 'skip', got {on_bad!r}")
    root, info = resolve_input(cfg, input_dir)
    shards = src_lib.discover(root)
    tok = _tokenizer_for(cfg, root, shards, on_bad)
    out = data_dir(workdir)
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_bytes(out / TOKENIZER_FILE, tok.model_proto)
    tok = Tokenizer.load(out / TOKENIZER_FILE, tuple(cfg.tokenizer.special_tokens))
    raw = fileio.json_text([r for s in shards for r in s.relpaths]).encode()
    fileio.atomic_write_bytes(out / man_lib.SOURCES_FILE, raw)
    sources = dict(path=man_lib.SOURCES_FILE, sha256=fileio.sha256_bytes(raw),
                   num_files=sum(len(s.paths) for s in shards))
    tmp = out / TMP_DIR
    tmp.mkdir()
    dtype = token_dtype(cfg)
    jobs = [shard_job(s, tok, tmp, dtype, on_bad, int(cfg.data.seq_len)) for s in shards]
    params = dict(seed=int(cfg.seed), seq_len=int(cfg.data.seq_len),
                  num_shards=int(cfg.data.num_shards), val_fraction=float(cfg.data.val_fraction),
                  min_val_sequences=int(cfg.data.min_val_sequences), tmp=str(tmp), dtype=dtype,
                  out=str(out))
    return dict(root=root, info=info, shards=shards, tok=tok, out=out, tmp=tmp, jobs=jobs,
                params=params, on_bad=on_bad,
                manifest=base_manifest(cfg, tok, input_dir, info, sources))


def _tokenizer_for(cfg, root: Path, shards, on_bad) -> Tokenizer:
    """The config's tokenizer; for released token rows (crystal.data.chunks exports,
    LLM360's JSON lines) the one they were made with, never one trained on them."""
    if not any(s.kind == src_lib.TOKENS for s in shards):
        return tok_lib.obtain(cfg, root, on_bad)
    chunk_files.verify_release(root)    # an export's index and files, when there is one
    model = cfg.tokenizer.model_path or root / TOKENIZER_FILE
    if not Path(model).exists():
        raise DataError(f"{root}: token rows need the tokenizer they were made with: put "
                        f"it at {root / TOKENIZER_FILE} or set tokenizer.model_path")
    return Tokenizer.from_config(cfg, model)


def group_parts(shard_results) -> dict[str, list[dict]]:
    parts: dict = {}
    for r in sorted(shard_results, key=lambda r: r["shard"]):
        for g, e in r["groups"].items():
            parts.setdefault(g, []).append(dict(e, shard=r["shard"]))
    return parts


@contextlib.contextmanager
def _without_main_module():
    """Starts spawn workers without re-running the caller's __main__.

    The workers only need crystal.data (the job functions are found by module name), and
    re-importing __main__ breaks for `python -` / `python -c` callers and re-runs scripts
    that lack an `if __name__ == "__main__"` guard.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class _Pool:
    """Ordered maps over one set of worker processes ('spawn': safe after JAX init, unlike
    fork); in-process when workers <= 1. A worker that dies is an error, never a hang."""

    def __init__(self, workers: int):
        self.workers, self.ex = workers, None

    def map(self, fn, jobs):
        if self.workers <= 1 or len(jobs) <= 1:
            return [fn(j) for j in jobs]
        # By module name: under `python -m crystal.data.prepare` fn lives in __main__,
        # which the workers do not import.
        fn = getattr(importlib.import_module("crystal.data.prepare"), fn.__name__)
        if self.ex is None:
            self.ex = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        with _without_main_module():  # the processes start on first submit
            it = self.ex.map(fn, jobs)
        return list(it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=exc[0] is not None)


def prepare(cfg, workdir, input_dir=None, workers=None, on_bad_record=None,
            overwrite=False) -> dict:
    """Prepares `workdir/data` from `input_dir` (default: data.input, else the sample).

    Refuses to replace data made with a different data/tokenizer config unless
    `overwrite`. Returns the manifest.
    """
    config_lib.validate(cfg)
    workers = int(workers or cfg.data.workers)
    out = data_dir(workdir)
    out.mkdir(parents=True, exist_ok=True)
    with fileio.file_lock(out / ".lock"):
        if not overwrite:
            _check_existing(cfg, workdir, input_dir)
        return _prepare_locked(cfg, workdir, input_dir, workers, on_bad_record)


def _prepare_locked(cfg, workdir, input_dir, workers, on_bad_record):
    t0 = time.perf_counter()
    st = setup(cfg, workdir, input_dir, on_bad_record)
    t1 = time.perf_counter()
    log.info("tokenizing %d shards with %d workers", len(st["jobs"]), workers)
    try:
        with _Pool(workers) as pool:
            results = pool.map(tokenize_shard, st["jobs"])
            t2 = time.perf_counter()
            parts = group_parts(results)
            plans = [plan_group(g, parts[g], st["params"]) for g in sorted(parts)]
            written = pool.map(write_shard, [j for p in plans for j in p["jobs"]])
        t3 = time.perf_counter()
        manifest = finish(st["manifest"], plans, written, results, cfg, st["out"])
    finally:
        shutil.rmtree(st["tmp"], ignore_errors=True)
    nbytes = sum(r["bytes"] for r in results)
    ntok = sum(g["num_tokens"] for g in manifest["groups"].values())
    write_log(cfg, st["out"], manifest, runner="local", workers=workers,
              shards=len(results), input_bytes=nbytes, tokens=ntok, setup_s=t1 - t0,
              tokenize_s=t2 - t1, write_s=t3 - t2, total_s=time.perf_counter() - t0,
              tokenize_cpu_s=sum(r["seconds"] for r in results))
    return manifest


def _warn_bad(manifest, unmatched):
    b = manifest["bad_records"]
    if b["skipped"]:
        log.warning("skipped %d bad records (%s); see bad_records in the manifest",
                    b["skipped"], ", ".join(f"{k}: {v}" for k, v in b["by_reason"].items()))
    for p in unmatched:
        log.warning("no prepared data group matches %s", p)


def _check_existing(cfg, workdir, input_dir=None) -> dict | None:
    got = man_lib.read(workdir, missing_ok=True)
    if got is None:
        return None
    man = got[0]
    want = data_identity(cfg, input_dir)
    have = man.get("data_identity")
    if have != want:
        diff = _diff(have or {}, want) if isinstance(have, dict) else ["data_identity missing"]
        raise DataMismatchError(
            f"{data_dir(workdir) / MANIFEST}: prepared with a different data config "
            f"({'; '.join(diff)}); use another workdir, or delete {data_dir(workdir)} (or "
            "pass --overwrite to crystal.data.prepare) to re-prepare")
    return man


def ensure_prepared(cfg, workdir) -> dict:
    """The workdir's manifest, preparing the data first if there is none.

    Data made with a different data/tokenizer config is an error, never overwritten.
    """
    man = _check_existing(cfg, workdir)
    if man is not None:
        return man
    out = data_dir(workdir)
    out.mkdir(parents=True, exist_ok=True)
    with fileio.file_lock(out / ".lock"):  # another process may have prepared meanwhile
        man = _check_existing(cfg, workdir)
        if man is not None:
            return man
        return _prepare_locked(cfg, workdir, None, int(cfg.data.workers), None)


# ----------------------------------------------------------------------------- CLI


FLAGS = (
    cli.Flag("workdir", "run folder; data goes to WORKDIR/data", required=True),
    cli.Flag("input", "source folder (SlimPajama .jsonl[.zst], StarCoder parquet, text, "
             "or released token rows: crystal.data.chunks exports, LLM360 token_ids JSON "
             "lines); default: data.input, else the sample corpus"),
    cli.Flag("workers", "tokenizer processes (default: data.workers)", int),
    cli.Flag("on_bad_record", "bad input: fail with file:line, or skip and count in the "
             "manifest", choices=("fail", "skip")),
    cli.Flag("overwrite", "replace data prepared with another config", bool, False),
)


def main(argv=None):
    def body(a):
        man = prepare(a.cfg, a.workdir, a.input, a.workers, a.on_bad_record,
                      overwrite=a.overwrite)
        summarize(man, a.workdir)
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_REQUIRED,
            argv=argv)


def summarize(man, workdir):
    for g, e in man["groups"].items():
        n = sum(c["num_sequences"] for c in e["shards"])
        v = e["val"]["num_sequences"] if e["val"] else 0
        print(f"{g:40s} {e['num_documents']:7d} docs {e['num_tokens']:10d} tokens "
              f"{n:7d} train + {v:4d} val sequences")
    print(f"wrote {data_dir(workdir) / MANIFEST}: {len(man['groups'])} groups x "
          f"{man['num_shards']} shards; bad records skipped: {man['bad_records']['skipped']}")


if __name__ == "__main__":
    raise SystemExit(main())
