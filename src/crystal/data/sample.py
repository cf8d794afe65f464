"""A real, deterministic mini pre-training corpus from what the Python installation ships.

Written in the two real source formats, so the sample takes the same path as SlimPajama
and StarCoder data:

    OUT/slimpajama/train/chunk1/example_train_{0..7}.jsonl.zst   prose, seven set names
    OUT/starcoder/{python,html,javascript,css}/train-0000K-of-0000N.parquet   code

Prose is spread over the seven SlimPajama set names by kind:
  RedPajamaCommonCrawl   the interpreter's help topics (pydoc_data.topics)
  RedPajamaWikipedia     module docstrings (one article per module)
  RedPajamaC4            function docstrings
  RedPajamaArXiv         class docstrings
  RedPajamaStackExchange docstrings with interactive `>>>` examples
  RedPajamaBook          long texts: CPython's LICENSE, idlelib's text files, the license
                         files of installed distributions
  RedPajamaGithub        the C headers of the installation's include directory
Code: the standard library's Python sources (tests excluded), and every HTML, JavaScript
and CSS file found in the standard library and site-packages. No text is synthesised.

Nothing is imported to get docstrings (modules are parsed with `ast`), and every choice is
a sort by path or path hash, so the same installation always gives the same corpus.

    python -m crystal.data.sample --out=DIR [--max_mb=8]
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import site
import sys
import sysconfig
from pathlib import Path

from crystal.errors import DataError

BUILDER_VERSION = 1
NUM_SLIMPAJAMA_SHARDS = 8   # example_train_0..7: four even, four odd
BUILD_SEED = 20231211       # fixes the (deterministic) deal of documents over shards
MIN_DOC_CHARS = 64          # one-line docstrings ("Return self.") are not documents
ZSTD_LEVEL = 3
# Share of --max_mb per group; a kind with less material available is simply smaller.
SHARES = {
    "RedPajamaCommonCrawl": 0.08, "RedPajamaC4": 0.06, "RedPajamaGithub": 0.08,
    "RedPajamaArXiv": 0.015, "RedPajamaBook": 0.03, "RedPajamaWikipedia": 0.015,
    "RedPajamaStackExchange": 0.01,
    "python": 0.45, "html": 0.05, "javascript": 0.05, "css": 0.03,
}
CODE_EXTS = {"html": (".html", ".htm"), "javascript": (".js",), "css": (".css",)}
# Tests, installed packages, and pydoc_data (a 0.5 MB string literal of the help topics,
# already in RedPajamaCommonCrawl) are not standard-library code.
_SKIP = {"__pycache__", "test", "tests", "idle_test", "site-packages", "dist-packages",
         "pydoc_data"}


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_dirs() -> list[Path]:
    ds = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        ds.update(site.getsitepackages())
    except AttributeError:  # some virtualenvs
        pass
    return sorted(Path(d) for d in ds if os.path.isdir(d))


def _phash(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def _read(p: Path) -> str | None:
    try:
        t = p.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return t if t.strip() else None


def _stdlib_py() -> list[tuple[str, Path]]:
    """Non-test stdlib modules, as (relpath, path) in path-hash order (a fair spread)."""
    root = _stdlib()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP and not x.startswith("."))
        for f in files:
            if f.endswith(".py"):
                p = Path(d) / f
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out, key=lambda rp: _phash(rp[0]))


class _Budget:
    """Collects documents for one group until its byte budget is spent."""

    def __init__(self, limit: float):
        self.limit, self.used, self.docs = limit, 0, []

    @property
    def full(self):
        return self.used >= self.limit * 0.98

    def add(self, text: str, **meta):
        """Takes the document if it fits (the first one always does)."""
        n = len(text.encode("utf-8"))
        if len(text) < MIN_DOC_CHARS or (self.docs and self.used + n > self.limit):
            return
        self.docs.append((text, meta))
        self.used += n


def _defs(body):
    """Function and class definitions under a statement list (no expression walk: fast)."""
    for st in body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield st
            yield from _defs(st.body)
        else:
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(st, field, None)
                if isinstance(sub, list):
                    yield from _defs(sub)
            for h in getattr(st, "handlers", None) or ():
                yield from _defs(h.body)


def _docstrings(files, b: dict):
    """Module/function/class/example docstrings into their groups' budgets."""
    kinds = ("RedPajamaWikipedia", "RedPajamaC4", "RedPajamaArXiv", "RedPajamaStackExchange")
    for rel, p in files:
        if all(b[k].full for k in kinds):
            return
        src = _read(p)
        if src is None:
            continue
        try:
            tree = ast.parse(src, filename=rel)
        except (SyntaxError, ValueError):
            continue
        mod = ast.get_docstring(tree)
        if mod:
            (b["RedPajamaStackExchange"] if ">>>" in mod else b["RedPajamaWikipedia"]).add(mod)
        for node in _defs(tree.body):
            d = ast.get_docstring(node)
            if not d:
                continue
            if ">>>" in d:
                b["RedPajamaStackExchange"].add(d)
            elif isinstance(node, ast.ClassDef):
                b["RedPajamaArXiv"].add(d)
            else:
                b["RedPajamaC4"].add(d)


def _books(b: _Budget):
    root = _stdlib()
    cands = [root / "LICENSE.txt"] + sorted((root / "idlelib").glob("*.txt"))
    for sd in _site_dirs():
        for dist in sorted(sd.glob("*.dist-info")):
            cands += sorted(x for x in dist.rglob("*") if x.is_file() and
                            x.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")))
    for p in cands:
        t = _read(p) if p.is_file() else None
        if t:
            b.add(t)


def _headers(b: _Budget):
    inc = Path(sysconfig.get_paths()["include"])
    files = sorted((x for x in inc.rglob("*.h") if x.is_file()),
                   key=lambda x: _phash(x.relative_to(inc).as_posix()))
    for p in files:
        t = _read(p)
        if t:
            b.add(t)


def _web_files() -> dict[str, list[tuple[str, Path]]]:
    """HTML/JS/CSS shipped in the stdlib and site-packages, as (label, path), sorted."""
    out = {k: [] for k in CODE_EXTS}
    roots = [("python", _stdlib())] + [("site-packages", d) for d in _site_dirs()]
    seen = set()
    for label, root in roots:
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__" and not x.startswith(".")
                             and not (label == "python" and x in ("site-packages",
                                                                   "dist-packages")))
            for f in sorted(files):
                for lang, exts in CODE_EXTS.items():
                    if f.lower().endswith(exts):
                        p = Path(d) / f
                        real = os.path.realpath(p)
                        if real not in seen:
                            seen.add(real)
                            out[lang].append((f"{label}/{p.relative_to(root).as_posix()}", p))
    return {k: sorted(v) for k, v in out.items()}


def collect(max_mb: float) -> dict[str, list[tuple[str, dict]]]:
    """group key (set name or language) -> [(text, meta)], deterministic."""
    cap = max_mb * 1e6
    b = {k: _Budget(share * cap) for k, share in SHARES.items()}
    import pydoc_data.topics
    for key in sorted(pydoc_data.topics.topics):
        b["RedPajamaCommonCrawl"].add(pydoc_data.topics.topics[key])
    py = _stdlib_py()
    _docstrings(py, b)
    _books(b["RedPajamaBook"])
    _headers(b["RedPajamaGithub"])
    for rel, p in py:
        if b["python"].full:
            break
        t = _read(p)
        if t:
            b["python"].add(t, path=f"cpython/Lib/{rel}")
    for lang, files in _web_files().items():
        for rel, p in files:
            t = _read(p)
            if t:
                b[lang].add(t, path=rel)
    return {k: v.docs for k, v in b.items()}


def _write_jsonl_zst(path: Path, records):
    import zstandard
    raw = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
                     .compress(raw))


def _write_parquet(path: Path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({
        "max_stars_repo_path": pa.array([m.get("path", "") for _, m in docs], pa.string()),
        "max_stars_repo_name": pa.array([m.get("path", "").split("/")[0] for _, m in docs],
                                        pa.string()),
        "max_stars_count": pa.array([None] * len(docs), pa.int64()),
        "id": pa.array([hashlib.sha1(t.encode()).hexdigest() for t, _ in docs], pa.string()),
        "content": pa.array([t for t, _ in docs], pa.string()),
    })
    pq.write_table(table, path, compression="zstd")


def build(out, max_mb: float = 8.0) -> dict:
    """Writes the sample corpus to `out` (atomically: built aside, then renamed)."""
    import numpy as np
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    docs = collect(max_mb)
    rng = np.random.default_rng(BUILD_SEED)
    shards = [[] for _ in range(NUM_SLIMPAJAMA_SHARDS)]
    stats = {}
    from crystal.data.sources import SLIMPAJAMA_SETS
    for name in SLIMPAJAMA_SETS:
        ds = docs[name]
        for k, i in enumerate(rng.permutation(len(ds))):
            shards[k % NUM_SLIMPAJAMA_SHARDS].append(
                {"text": ds[i][0], "meta": {"redpajama_set_name": name}})
        stats[f"slimpajama.{name}"] = dict(documents=len(ds),
                                           bytes=sum(len(t.encode()) for t, _ in ds))
    d = tmp / "slimpajama" / "train" / "chunk1"
    d.mkdir(parents=True)
    for k, recs in enumerate(shards):
        order = rng.permutation(len(recs))  # sets interleave within a shard, as in SlimPajama
        _write_jsonl_zst(d / f"example_train_{k}.jsonl.zst", [recs[i] for i in order])
    for lang in ("python", "html", "javascript", "css"):
        ds = docs[lang]
        stats[f"starcoder.{lang}"] = dict(documents=len(ds),
                                          bytes=sum(len(t.encode()) for t, _ in ds))
        if not ds:
            print(f"warning: no {lang} files in this installation; starcoder.{lang} is "
                  "left out of the sample corpus", file=sys.stderr)
            continue
        n = 4 if lang == "python" else 1
        ld = tmp / "starcoder" / lang
        ld.mkdir(parents=True)
        for k in range(n):
            _write_parquet(ld / f"train-{k:05d}-of-{n:05d}.parquet", ds[k::n])
    info = dict(builder_version=BUILDER_VERSION, python=sys.version, prefix=sys.prefix,
                max_mb=max_mb, groups=stats,
                total_bytes=sum(v["bytes"] for v in stats.values()))
    (tmp / ".crystal_sample.json").write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, out)
    return info


def cache_key(max_mb: float) -> str:
    """Python build + installed distributions + size: what the corpus is made of."""
    import importlib.metadata as md
    dists = sorted({f"{d.metadata['Name']}=={d.version}" for d in md.distributions()
                    if d.metadata["Name"]})
    ident = json.dumps(dict(v=BUILDER_VERSION, python=sys.version, prefix=sys.prefix,
                            max_mb=float(max_mb), dists=dists), sort_keys=True)
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return f"{tag}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def ensure_sample(cfg=None, max_mb: float | None = None) -> Path:
    """The cached sample corpus (built on first use) under CACHE/sample/<key>."""
    from crystal import fileio
    if max_mb is None:
        max_mb = float(cfg.data.sample_max_mb) if cfg is not None else 8.0
    path = fileio.cache_root(cfg) / "sample" / cache_key(max_mb)
    if not path.exists():
        with fileio.file_lock(path.with_name(path.name + ".lock")):
            if not path.exists():
                build(path, max_mb)
    return path


def main(argv=None):
    def body(a):
        if Path(a.out).exists():
            raise DataError(f"--out={a.out}: already exists; choose a new folder")
        info = build(a.out, a.max_mb)
        for g, s in sorted(info["groups"].items()):
            print(f"{g:40s} {s['documents']:6d} docs {s['bytes'] / 1e6:7.3f} MB")
        print(f"total {info['total_bytes'] / 1e6:.2f} MB -> {a.out}")
    from crystal import cli
    return cli.run(body, doc=__doc__.split("\n\n")[0], argv=argv, flags=[
        cli.Flag("out", "folder to write the corpus to (must not exist)", required=True),
        cli.Flag("max_mb", "approximate size cap in MB", float, 8.0)])


if __name__ == "__main__":
    raise SystemExit(main())
