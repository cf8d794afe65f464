"""The bundled sample corpus: real text shipped with crystal, written in the real formats.

`corpus/sample.jsonl.zst` (committed; 3103 documents, 6.0 MB of text, 1.1 MB compressed;
sources and licenses in `corpus/NOTICE.md`, built once by `crystal.data.corpus.build`) is
the only thing the corpus is made of, so it is the same on every machine whatever is
installed. Its sha256 is in `corpus/expected.json` and is checked on every read.
`build` writes it out in the two real source formats, so the sample takes the same path
as SlimPajama and StarCoder data:

    OUT/slimpajama/train/chunk1/example_train_{0..7}.jsonl   prose, seven set names
    OUT/starcoder/{python,html,javascript,css}/train-0000K-of-0000N.parquet   code

`max_mb` keeps each group's first documents up to its share of max_mb (the full corpus at
8, the default). SlimPajama lines are written uncompressed (zstd's output could change with
the zstandard version; the reader takes `.jsonl` and `.jsonl.zst` alike); every choice is a
sort by a hash, so the documents and their order depend only on the corpus and max_mb.

    python -m crystal.data.sample --out=DIR [--max_mb=8]
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import zstandard

from crystal import cli, fileio
from crystal.data.sources import SLIMPAJAMA_SETS
from crystal.errors import DataError

BUILDER_VERSION = 2
CORPUS_DIR = Path(__file__).with_name("corpus")
CORPUS = CORPUS_DIR / "sample.jsonl.zst"
EXPECTED = CORPUS_DIR / "expected.json"
INFO_FILE = ".crystal_sample.json"
NUM_SLIMPAJAMA_SHARDS = 8   # example_train_0..7: four even, four odd
MIN_DOC_CHARS = 64          # one-line docstrings ("Return self.") are not documents
LANGUAGES = ("python", "html", "javascript", "css")
# Share of max_mb per group (crystal.data.corpus.build chose the corpus with the same).
SHARES = {
    "RedPajamaCommonCrawl": 0.08, "RedPajamaC4": 0.06, "RedPajamaGithub": 0.08,
    "RedPajamaArXiv": 0.015, "RedPajamaBook": 0.03, "RedPajamaWikipedia": 0.015,
    "RedPajamaStackExchange": 0.01,
    "python": 0.45, "html": 0.05, "javascript": 0.05, "css": 0.03,
}


class Budget:
    """Collects one group's documents until its byte budget is spent."""

    def __init__(self, limit: float):
        self.limit, self.used, self.docs = limit, 0, []

    @property
    def full(self):
        return self.used >= self.limit * 0.98

    def add(self, doc: dict):
        """Takes the document if it fits (the first one always does)."""
        n = len(doc["text"].encode("utf-8"))
        if len(doc["text"]) < MIN_DOC_CHARS or (self.docs and self.used + n > self.limit):
            return
        self.docs.append(doc)
        self.used += n


@functools.cache
def expected() -> dict:
    """The recorded hashes (corpus file; tokenizer, manifest and loss of the default run)."""
    return fileio.read_json(EXPECTED, DataError)


def corpus_sha256() -> str:
    return expected()["corpus_sha256"]


def read_corpus(path=CORPUS, sha256: str | None = None) -> list[dict]:
    """The corpus documents ({group, source, license, text}), after checking the file is
    the recorded one: an edited or truncated corpus is an error, never other data."""
    raw = Path(path).read_bytes()
    want = sha256 or corpus_sha256()
    if fileio.sha256_bytes(raw) != want:
        raise DataError(f"{path}: sha256 {fileio.sha256_bytes(raw)} is not the recorded "
                        f"{want} ({EXPECTED.name}); restore the file from git")
    text = zstandard.ZstdDecompressor().decompress(raw).decode("utf-8")
    return [json.loads(line) for line in text.splitlines()]


def collect(max_mb: float, docs: list[dict] | None = None) -> dict[str, list[dict]]:
    """group key (set name or language) -> its documents within its share of max_mb."""
    b = {k: Budget(share * max_mb * 1e6) for k, share in SHARES.items()}
    for d in read_corpus() if docs is None else docs:
        b[d["group"]].add(d)
    return {k: v.docs for k, v in b.items()}


def _key(doc: dict) -> str:
    return hashlib.sha256(doc["source"].encode()).hexdigest()


def _slimpajama_shards(docs: dict) -> list[list[dict]]:
    """Each set's documents dealt over the shards by hash order, sets interleaved within
    a shard by hash order (as in SlimPajama)."""
    shards = [[] for _ in range(NUM_SLIMPAJAMA_SHARDS)]
    for name in SLIMPAJAMA_SETS:
        for k, d in enumerate(sorted(docs[name], key=_key)):
            shards[k % NUM_SLIMPAJAMA_SHARDS].append(d)
    return [sorted(s, key=lambda d: _key(d) + d["group"]) for s in shards]


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)


def _parquet(path: Path, docs: list[dict]):
    import pyarrow as pa   # lazily: ~0.2 s of start-up, only building the sample writes parquet
    import pyarrow.parquet as pq
    table = pa.table({   # The Stack's columns
        "max_stars_repo_path": pa.array([d["source"] for d in docs], pa.string()),
        "max_stars_repo_name": pa.array([d["source"].split("/")[0] for d in docs],
                                        pa.string()),
        "max_stars_repo_licenses": pa.array([[d["license"]] for d in docs],
                                            pa.list_(pa.string())),
        "max_stars_count": pa.array([None] * len(docs), pa.int64()),
        "id": pa.array([hashlib.sha1(d["text"].encode()).hexdigest() for d in docs],
                       pa.string()),
        "content": pa.array([d["text"] for d in docs], pa.string()),
    })
    with fileio.atomic_open(path) as f:
        pq.write_table(table, f, compression="zstd")


def documents_sha256(docs: dict) -> str:
    """Identity of the written documents: group, source and text, in written order."""
    h = hashlib.sha256()
    for g in sorted(docs):
        for d in docs[g]:
            h.update(json.dumps([g, d["source"], d["text"]], ensure_ascii=False).encode())
    return h.hexdigest()


def build(out, max_mb: float = 8.0) -> dict:
    """Writes the sample corpus to `out` (which must not exist) whole or not at all."""
    docs = collect(max_mb)
    stats = {}
    with fileio.atomic_dir(out) as tmp:
        d = tmp / "slimpajama" / "train" / "chunk1"
        d.mkdir(parents=True)
        for k, recs in enumerate(_slimpajama_shards(docs)):
            fileio.atomic_write_bytes(d / f"example_train_{k}.jsonl", _jsonl(
                {"text": r["text"], "meta": {"redpajama_set_name": r["group"],
                                             "source": r["source"], "license": r["license"]}}
                for r in recs), sync=False)
        for lang in LANGUAGES:
            n = 4 if lang == "python" else 1
            (tmp / "starcoder" / lang).mkdir(parents=True)
            for k in range(n):
                _parquet(tmp / "starcoder" / lang / f"train-{k:05d}-of-{n:05d}.parquet",
                         docs[lang][k::n])
        for g, ds in docs.items():
            src = "starcoder" if g in LANGUAGES else "slimpajama"
            stats[f"{src}.{g}"] = dict(documents=len(ds),
                                       bytes=sum(len(x["text"].encode()) for x in ds))
        info = dict(builder_version=BUILDER_VERSION, corpus_sha256=corpus_sha256(),
                    max_mb=float(max_mb), documents_sha256=documents_sha256(docs),
                    groups=stats, total_bytes=sum(v["bytes"] for v in stats.values()))
        fileio.write_json(tmp / INFO_FILE, info)
    return info


def cache_key(max_mb: float) -> str:
    """The corpus and the size: all the sample is made of."""
    return f"v{BUILDER_VERSION}-{corpus_sha256()[:16]}-{float(max_mb):g}mb"


def ensure_sample(cfg=None, max_mb: float | None = None) -> Path:
    """The sample corpus written out (on first use) under CACHE/sample/<key>."""
    if max_mb is None:
        max_mb = float(cfg.data.sample_max_mb) if cfg is not None else 8.0
    path = fileio.cache_root(cfg) / "sample" / cache_key(max_mb)
    if not path.exists():
        with fileio.file_lock(path.with_name(path.name + ".lock")):
            if not path.exists():
                build(path, max_mb)
    return path


def info(path) -> dict:
    """What `build` recorded about a written sample."""
    return fileio.read_json(Path(path) / INFO_FILE, DataError)


def main(argv=None):
    def body(a):
        if Path(a.out).exists():
            raise DataError(f"--out={a.out}: already exists; choose a new folder")
        got = build(a.out, a.max_mb)
        for g, s in sorted(got["groups"].items()):
            print(f"{g:40s} {s['documents']:6d} docs {s['bytes'] / 1e6:7.3f} MB")
        print(f"total {got['total_bytes'] / 1e6:.2f} MB -> {a.out}; documents sha256 "
              f"{got['documents_sha256']}")
    cli.run(body, doc=__doc__.split("\n\n")[0], argv=argv, flags=[
        cli.Flag("out", "folder to write the corpus to (must not exist)", required=True),
        cli.Flag("max_mb", "approximate size cap in MB", float, 8.0)])


if __name__ == "__main__":
    sys.exit(main())
