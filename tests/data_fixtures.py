"""Small corpora in the real source formats, written by the data tests.

Text is real (standard-library docstrings and sources); the formats are the real ones:
SlimPajama jsonl / jsonl.zst, StarCoder parquet with a `content` column, a text folder.
"""
import ast
import functools
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from crystal import config as cfg_lib

STDLIB = Path(os.__file__).parent
MODULES = ["argparse.py", "textwrap.py", "difflib.py", "fractions.py", "heapq.py",
           "shlex.py", "statistics.py", "string.py", "bisect.py", "colorsys.py",
           "calendar.py", "csv.py", "dataclasses.py", "enum.py", "functools.py", "glob.py"]


def docstrings(limit=None):
    return list(_docstrings())[:limit]


@functools.lru_cache(maxsize=1)
def _docstrings():
    out = []
    for m in MODULES:
        tree = ast.parse((STDLIB / m).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 60:
                    out.append(d)
    return tuple(out)


def sources(names):
    return [(STDLIB / m).read_text() for m in names]


def jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write_zst(path: Path, raw: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))


def write_parquet(path: Path, texts, binary=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    typ = pa.binary() if binary else pa.string()
    pq.write_table(pa.table({"content": pa.array(texts, typ),
                             "max_stars_repo_path": pa.array([f"f{i}.py" for i in
                                                              range(len(texts))])}), path)


def write_corpus(root: Path) -> Path:
    """4 SlimPajama shards (two sets, .zst and plain), StarCoder python + css, a text dir."""
    docs = docstrings()
    sets = ["RedPajamaC4", "RedPajamaWikipedia"]
    for k in range(4):
        recs = [{"text": d, "meta": {"redpajama_set_name": sets[i % 2]}}
                for i, d in enumerate(docs[k::4])]
        p = root / "slimpajama" / "chunk1" / f"example_train_{k}.jsonl"
        if k < 2:
            write_zst(p.with_name(p.name + ".zst"), jsonl_bytes(recs))
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jsonl_bytes(recs))
    code = sources(MODULES[:8])
    write_parquet(root / "starcoder" / "python" / "train-00000-of-00002.parquet", code[:4])
    write_parquet(root / "starcoder" / "python" / "train-00001-of-00002.parquet", code[4:])
    css = (STDLIB / "pydoc_data" / "_pydoc.css").read_text()
    write_parquet(root / "starcoder" / "css" / "train-00000-of-00001.parquet",
                  [css, css.replace("{", "{\n")] * 6)
    for m in MODULES[8:12]:
        (root / "notes").mkdir(parents=True, exist_ok=True)
        (root / "notes" / (m + ".txt")).write_text((STDLIB / m).read_text())
    return root


def small_config(tmp_path, **overrides):
    """The tiny CrystalCoder config at test size (vocab 512, seq_len 32, 3 shards)."""
    o = {"tokenizer.vocab_size": 512, "model.vocab_size": 576, "data.seq_len": 32,
         "data.num_shards": 3, "data.workers": 1, "data.cache_dir": str(tmp_path / "cache"),
         "data.sample_max_mb": 0.6}
    o.update(overrides)
    return cfg_lib.load("crystalcoder_tiny", o)
