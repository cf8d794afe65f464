"""Source files -> numbered, hashed LLM360 data chunks (docs/data_format.md).

Four steps, each a pure function of plain-dict jobs, so the local process pool here and the
Beam pipeline in crystal.data.beam run exactly the same code and write the same bytes:

1. `tokenize_shard`: one source shard -> per-group token files (EOS after every document,
   no BOS) and document lengths, plus its bad-record counts.
2. `plan_group`: one group's documents, in shard order, get a seeded global shuffle and
   are concatenated; the stream is cut into rows of seq_len + 1, the first rows are the
   validation split, the rest go in order into `data.num_chunks` contiguous chunks.
3. `write_chunk`: one chunk (or val) of the plan, gathered from the token files, written
   under a temporary name and renamed.
4. `finish`: the manifest, written last and atomically.

Nothing depends on how many processes run the steps: shards are independent, plans are
built from shard-ordered parts, chunks from the plan.

    python -m crystal.data.prepare --config=configs/crystalcoder_tiny.py --workdir=DIR \
        [--input=SOURCE_DIR] [--workers=N] [--on_bad_record=skip]
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from crystal import __version__
from crystal import cli, fileio
from crystal import config as config_lib
from crystal.data import sources as src_lib
from crystal.data.sources import BadRecords, DataError, Shard
from crystal.data.tokenizer import EOS_ID, Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
TMP_DIR = ".prepare-tmp"
LOG_FILE = "prepare_log.json"


class DataMismatchError(DataError):
    """The workdir holds data prepared with another data/tokenizer config."""


def data_dir(workdir) -> Path:
    return Path(workdir) / "data"


def chunk_name(index: int) -> str:
    return f"train_{index:05d}.npy"


def token_dtype(cfg) -> str:
    return "uint16" if cfg.model.vocab_size <= 1 << 16 else "int32"


# ----------------------------------------------------------------------------- identity


def input_identity(cfg, input_dir=None) -> dict:
    """What names the source corpus in the manifest (no machine-specific paths for the
    bundled sample)."""
    given = input_dir or cfg.data.input
    if given:
        return dict(kind="dir", path=str(Path(given).resolve()))
    return dict(kind="sample", max_mb=float(cfg.data.sample_max_mb))


def data_identity(cfg, input_dir=None) -> dict:
    """Every setting that changes the prepared bytes; ensure_prepared compares these."""
    d, t = cfg.data, cfg.tokenizer
    return dict(
        seed=int(cfg.seed), input=input_identity(cfg, input_dir), seq_len=int(d.seq_len),
        num_chunks=int(d.num_chunks), val_fraction=float(d.val_fraction),
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


def shard_job(shard: Shard, tok: Tokenizer, tmp, dtype, on_bad_record) -> dict:
    return dict(shard=dict(index=shard.index, kind=shard.kind, paths=list(shard.paths),
                           relpaths=list(shard.relpaths), group=shard.group,
                           parity=shard.parity),
                tokenizer=str(tok.path), tokenizer_sha256=tok.sha256, tmp=str(tmp),
                dtype=dtype, on_bad_record=on_bad_record)


def tokenize_shard(job: dict) -> dict:
    """Step 1: a shard's documents -> `tmp/tokens/<shard>.<group>.{tokens,lens}.npy`."""
    t0 = time.perf_counter()
    s = job["shard"]
    shard = Shard(s["index"], s["kind"], tuple(s["paths"]), tuple(s["relpaths"]), s["group"],
                  s["parity"])
    tok = _tokenizer(job["tokenizer"], job["tokenizer_sha256"])
    dtype = np.dtype(job["dtype"])
    bad = BadRecords(job["on_bad_record"])
    per_group: dict[str, tuple[list, list]] = {}
    nbytes = 0
    for docs in src_lib.iter_files(shard, bad):
        if not docs:
            continue
        texts = [t for _, t in docs]
        nbytes += sum(len(t.encode("utf-8")) for t in texts)
        for (group, _), ids in zip(docs, tok.encode_batch(texts)):
            arrs, lens = per_group.setdefault(group, ([], []))
            a = np.empty(len(ids) + 1, dtype)
            a[:-1] = ids
            a[-1] = EOS_ID
            arrs.append(a)
            lens.append(len(a))
    out_dir = Path(job["tmp"]) / "tokens"
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = {}
    for group in sorted(per_group):
        arrs, lens = per_group[group]
        base = out_dir / f"{shard.index:06d}.{group}"
        tokens = np.concatenate(arrs)
        _save(f"{base}.tokens.npy", tokens)
        _save(f"{base}.lens.npy", np.asarray(lens, np.int64))
        groups[group] = dict(tokens=f"{base}.tokens.npy", lens=f"{base}.lens.npy",
                             num_documents=len(lens), num_tokens=int(tokens.size))
    return dict(shard=shard.index, groups=groups, bad=bad.to_json(), bytes=nbytes,
                seconds=time.perf_counter() - t0)


def _save(path, arr):
    with fileio.atomic_open(path) as f:
        np.save(f, arr, allow_pickle=False)


# ----------------------------------------------------------------------------- step 2


def group_seed(seed: int, group: str) -> np.random.SeedSequence:
    """Each group's shuffle depends on (seed, name) only: adding a group changes no other."""
    g = int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "little")
    return np.random.SeedSequence([int(seed), g])


def plan_group(group: str, parts: list[dict], params: dict) -> dict:
    """Step 2: shuffle a group's documents, split off val, cut rows into chunks.

    `parts` are the group's entries from tokenize_shard, any order (sorted by shard here);
    `params`: seed, seq_len, num_chunks, val_fraction, min_val_sequences, tmp.
    The plan is a (documents, 4) int64 table in shuffled order: token file, start in it,
    length, end position in the shuffled stream.
    """
    parts = sorted(parts, key=lambda p: p["shard"])
    lens = [np.load(p["lens"], allow_pickle=False) for p in parts]
    n_docs = sum(len(x) for x in lens)
    file_id = np.concatenate([np.full(len(x), i, np.int64) for i, x in enumerate(lens)])
    start = np.concatenate([np.cumsum(x) - x for x in lens]).astype(np.int64)
    length = np.concatenate(lens).astype(np.int64)
    perm = np.random.default_rng(group_seed(params["seed"], group)).permutation(n_docs)
    table = np.stack([file_id[perm], start[perm], length[perm], np.cumsum(length[perm])], 1)
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
    N = params["num_chunks"]
    if train_rows < N:
        raise DataError(f"data group {group}: {total} tokens give {rows} sequences of {L1} "
                        f"tokens; {n_val} validation + at least data.num_chunks={N} training "
                        "sequences are needed (add data, or lower data.num_chunks / "
                        "data.seq_len / data.val_fraction)")
    val_docs = int(np.searchsorted(table[:, 3] - table[:, 2], train_start, "left"))
    plan_dir = Path(params["tmp"]) / "plans"
    plan_dir.mkdir(parents=True, exist_ok=True)
    plan_path = plan_dir / f"{group}.npy"
    _save(plan_path, table)
    common = dict(group=group, plan=str(plan_path), token_files=[p["tokens"] for p in parts],
                  seq_len=params["seq_len"], dtype=params["dtype"], out=params["out"])
    jobs = []
    for i in range(N):
        a, b = i * train_rows // N, (i + 1) * train_rows // N
        jobs.append(dict(common, index=i, path=f"{group}/{chunk_name(i)}",
                         start=train_start + a * L1, end=train_start + b * L1))
    if n_val:
        jobs.append(dict(common, index=-1, path=f"{group}/val.npy", start=0, end=n_val * L1))
    dropped = total - train_start - train_rows * L1
    return dict(group=group, source=group.split(".")[0], num_documents=n_docs,
                num_tokens=total, val_documents=val_docs, dropped_tokens=int(dropped),
                jobs=jobs)


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


def write_chunk(job: dict) -> dict:
    """Step 3: one chunk file, written under a temporary name, then renamed."""
    L1 = job["seq_len"] + 1
    flat = gather(job)
    path = Path(job["out"]) / job["path"]
    rows = flat.reshape(-1, L1)
    with fileio.atomic_open(path, sync=True) as f:
        np.save(f, rows, allow_pickle=False)
    return dict(group=job["group"], index=job["index"], path=job["path"],
                sha256=fileio.file_sha256(path), num_sequences=int(rows.shape[0]),
                num_tokens=int(rows.size), tokens_per_source={job["group"]: int(rows.size)})


# ----------------------------------------------------------------------------- step 4


def base_manifest(cfg, tok: Tokenizer, input_dir, input_info: dict) -> dict:
    g = fileio.git_commit()
    commit, dirty = g["commit"] or "unknown", g["dirty"]
    return dict(
        format=FORMAT, crystal_version=__version__, git_commit=commit, git_dirty=dirty,
        created_by="crystal.data.prepare", seed=int(cfg.seed), seq_len=int(cfg.data.seq_len),
        dtype=token_dtype(cfg), num_chunks=int(cfg.data.num_chunks),
        tokenizer=dict(path=TOKENIZER_FILE, sha256=tok.sha256, vocab_size=tok.base_vocab_size,
                       special_tokens=list(tok.special_tokens),
                       model_vocab_size=int(cfg.model.vocab_size),
                       trained=not bool(cfg.tokenizer.model_path)),
        input=input_info, data_identity=data_identity(cfg, input_dir),
        config=config_lib.to_json_dict(cfg),
    )


def finish(manifest: dict, plans: list[dict], written: list[dict], shard_results: list[dict],
           cfg, out_dir) -> dict:
    """Step 4: assemble and atomically write the manifest (chunk order, not finish order)."""
    by_group: dict = {}
    for w in written:
        by_group.setdefault(w["group"], []).append(w)
    groups = {}
    for p in sorted(plans, key=lambda p: p["group"]):
        ws = sorted(by_group.get(p["group"], []), key=lambda w: w["index"])
        chunks = [dict(index=w["index"], path=w["path"], sha256=w["sha256"],
                       num_sequences=w["num_sequences"], num_tokens=w["num_tokens"],
                       tokens_per_source=w["tokens_per_source"]) for w in ws if w["index"] >= 0]
        val = [dict(path=w["path"], sha256=w["sha256"], num_sequences=w["num_sequences"],
                    num_tokens=w["num_tokens"]) for w in ws if w["index"] < 0]
        if len(chunks) != cfg.data.num_chunks:
            raise DataError(f"data group {p['group']}: {len(chunks)} chunks written, "
                            f"{cfg.data.num_chunks} planned")
        groups[p["group"]] = dict(
            source=p["source"], num_documents=p["num_documents"], num_tokens=p["num_tokens"],
            val_documents=p["val_documents"], dropped_tokens=p["dropped_tokens"],
            chunks=chunks, val=val[0] if val else None)
    shard_results = sorted(shard_results, key=lambda r: r["shard"])
    manifest = dict(manifest, groups=groups,
                    bad_records=BadRecords.merge(r["bad"] for r in shard_results))
    names = list(groups)
    manifest["unmatched_mixture_patterns"] = sorted(
        f"{s}.mixture.{c}: {comp.groups}" for s in config_lib.stage_names(cfg)
        for c, comp in cfg.stages[s].mixture.items()
        if not config_lib.match_groups(comp.groups, names))
    raw = (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode()
    fileio.atomic_write_bytes(Path(out_dir) / MANIFEST, raw)
    return manifest


# ----------------------------------------------------------------------------- driver


def resolve_input(cfg, input_dir=None) -> tuple[Path, dict]:
    """The source folder (the bundled sample, built if absent, when none is given)."""
    given = input_dir or cfg.data.input
    if given:
        p = Path(given)
        n, listing = src_lib.listing_sha256(p)
        return p, dict(kind="dir", path=str(p.resolve()), num_files=n, listing_sha256=listing)
    from crystal.data import sample
    p = sample.ensure_sample(cfg)
    n, listing = src_lib.listing_sha256(p)
    info = json.loads((p / ".crystal_sample.json").read_text())
    return p, dict(kind="sample", max_mb=float(cfg.data.sample_max_mb), num_files=n,
                   listing_sha256=listing, builder_version=info["builder_version"],
                   python=info["python"])


def _clear(out: Path):
    """Removes what an earlier (possibly crashed) preparation left; manifest first."""
    (out / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    if not out.exists():
        return
    for d in out.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            for f in list(d.glob("train_*.npy")) + list(d.glob("val.npy")) + \
                    list(d.glob(".*.tmp-*")):
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
    from crystal.data import tokenizer as tok_lib
    tok = tok_lib.obtain(cfg, root, on_bad)
    out = data_dir(workdir)
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_bytes(out / TOKENIZER_FILE, tok.model_proto)
    tok = Tokenizer.load(out / TOKENIZER_FILE, tuple(cfg.tokenizer.special_tokens))
    tmp = out / TMP_DIR
    tmp.mkdir()
    dtype = token_dtype(cfg)
    jobs = [shard_job(s, tok, tmp, dtype, on_bad) for s in shards]
    params = dict(seed=int(cfg.seed), seq_len=int(cfg.data.seq_len),
                  num_chunks=int(cfg.data.num_chunks), val_fraction=float(cfg.data.val_fraction),
                  min_val_sequences=int(cfg.data.min_val_sequences), tmp=str(tmp), dtype=dtype,
                  out=str(out))
    return dict(root=root, info=info, shards=shards, tok=tok, out=out, tmp=tmp, jobs=jobs,
                params=params, on_bad=on_bad,
                manifest=base_manifest(cfg, tok, input_dir, info))


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
            import concurrent.futures as cf
            import multiprocessing as mp
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
            written = pool.map(write_chunk, [j for p in plans for j in p["jobs"]])
        t3 = time.perf_counter()
        manifest = finish(st["manifest"], plans, written, results, cfg, st["out"])
    finally:
        shutil.rmtree(st["tmp"], ignore_errors=True)
    nbytes = sum(r["bytes"] for r in results)
    ntok = sum(g["num_tokens"] for g in manifest["groups"].values())
    prep_log = dict(runner="local", workers=workers, shards=len(results), input_bytes=nbytes,
                    tokens=ntok, setup_s=t1 - t0, tokenize_s=t2 - t1, write_s=t3 - t2,
                    total_s=time.perf_counter() - t0,
                    tokenize_cpu_s=sum(r["seconds"] for r in results))
    fileio.write_json(st["out"] / LOG_FILE, prep_log, sync=True)
    _warn_bad(manifest)
    return manifest


def _warn_bad(manifest):
    b = manifest["bad_records"]
    if b["skipped"]:
        log.warning("skipped %d bad records (%s); see bad_records in the manifest",
                    b["skipped"], ", ".join(f"{k}: {v}" for k, v in b["by_reason"].items()))
    for p in manifest["unmatched_mixture_patterns"]:
        log.warning("no prepared data group matches %s", p)


def read_manifest(workdir) -> dict | None:
    path = data_dir(workdir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None


def _check_existing(cfg, workdir, input_dir=None) -> dict | None:
    man = read_manifest(workdir)
    if man is None:
        return None
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
    cli.Flag("input", "source folder (SlimPajama .jsonl[.zst], StarCoder parquet, text); "
             "default: data.input, else the sample corpus"),
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
        n = sum(c["num_sequences"] for c in e["chunks"])
        v = e["val"]["num_sequences"] if e["val"] else 0
        print(f"{g:40s} {e['num_documents']:7d} docs {e['num_tokens']:10d} tokens "
              f"{n:7d} train + {v:4d} val sequences")
    print(f"wrote {data_dir(workdir) / MANIFEST}: {len(man['groups'])} groups x "
          f"{man['num_chunks']} chunks; bad records skipped: {man['bad_records']['skipped']}")


if __name__ == "__main__":
    raise SystemExit(main())
