"""Re-hashes every file a manifest names and reports each mismatch by name.

    python -m crystal.data.verify --workdir=DIR      (exit 2: one line per problem, then error:)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from crystal import cli, fileio
from crystal.errors import DataError


def _files(man: dict):
    """(relpath, entry) of every chunk and val file, in manifest order."""
    for g, e in man.get("groups", {}).items():
        for c in e.get("chunks", []):
            yield c["path"], c
        if e.get("val"):
            yield e["val"]["path"], e["val"]


def verify(workdir) -> tuple[int, list[str]]:
    """(files checked, problems); no problems means every byte matches the manifest."""
    root = Path(workdir) / "data"
    mpath = root / "manifest.json"
    try:
        man = json.loads(mpath.read_text())
    except FileNotFoundError:
        return 0, [f"{mpath}: no manifest"]
    except json.JSONDecodeError as e:
        return 0, [f"{mpath}:{e.lineno}: bad JSON: {e.msg}"]
    problems = []
    tok = man.get("tokenizer", {})
    tpath = root / tok.get("path", "tokenizer.model")
    n = 1
    if not tpath.exists():
        problems.append(f"{tok.get('path')}: missing")
    elif fileio.file_sha256(tpath) != tok.get("sha256"):
        problems.append(f"{tok.get('path')}: sha256 mismatch (manifest {tok.get('sha256')}, "
                        f"file {fileio.file_sha256(tpath)})")
    L1 = int(man["seq_len"]) + 1
    dtype = np.dtype(man["dtype"])
    for rel, e in _files(man):
        n += 1
        p = root / rel
        if not p.exists():
            problems.append(f"{rel}: missing")
            continue
        digest = fileio.file_sha256(p)
        if digest != e["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (manifest {e['sha256']}, file {digest})")
            continue
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            problems.append(f"{rel}: unreadable ({err})")
            continue
        if a.shape != (e["num_sequences"], L1) or a.dtype != dtype:
            problems.append(f"{rel}: shape {a.shape} {a.dtype}, manifest says "
                            f"({e['num_sequences']}, {L1}) {dtype}")
        elif a.size != e["num_tokens"]:
            problems.append(f"{rel}: {a.size} tokens, manifest says {e['num_tokens']}")
    return n, problems


def main(argv=None):
    def body(args):
        n, problems = verify(args.workdir)
        for p in problems:
            print(f"bad: {p}", file=sys.stderr)
        if problems:
            raise DataError(f"{len(problems)} of {n} files failed verification against "
                            f"{Path(args.workdir) / 'data' / 'manifest.json'}")
        print(f"ok: {n} files match {Path(args.workdir) / 'data' / 'manifest.json'}")
    return cli.run(body, doc=__doc__.split("\n\n")[0], argv=argv,
            flags=[cli.Flag("workdir", "run folder holding data/manifest.json", required=True)])


if __name__ == "__main__":
    raise SystemExit(main())
