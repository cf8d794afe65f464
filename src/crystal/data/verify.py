"""Re-hashes every file a manifest names and reports each mismatch by name.

    python -m crystal.data.verify --workdir=DIR      (exit 2: one line per problem, then error:)
"""

from __future__ import annotations

import sys

import numpy as np

from crystal import cli, fileio
from crystal.data import manifest as man_lib
from crystal.errors import DataError


def _shape_problem(rel: str, a: np.ndarray, e: dict, L1: int, dtype) -> str | None:
    """What is wrong with a hashed array's shape or dtype, if anything."""
    if "num_documents" in e:       # a group's document table
        want, wdt = (e["num_documents"], 4), np.dtype(np.int64)
    else:
        want, wdt = (e["num_sequences"], L1), dtype
    if a.shape != want or a.dtype != wdt:
        return f"{rel}: shape {a.shape} {a.dtype}, manifest says {want} {wdt}"
    if "num_tokens" in e and a.size != e["num_tokens"]:
        return f"{rel}: {a.size} tokens, manifest says {e['num_tokens']}"
    return None


def verify(workdir) -> tuple[int, list[str]]:
    """(files checked, problems); no problems means every byte matches the manifest."""
    root = man_lib.data_dir(workdir)
    try:
        man, _ = man_lib.read(workdir)
    except DataError as e:
        return 0, [str(e)]
    problems = []
    tok = man["tokenizer"]
    tpath = root / tok.get("path", man_lib.TOKENIZER_FILE)
    n = 1
    if not tpath.exists():
        problems.append(f"{tok.get('path')}: missing")
    elif fileio.file_sha256(tpath) != tok.get("sha256"):
        problems.append(f"{tok.get('path')}: sha256 mismatch (manifest {tok.get('sha256')}, "
                        f"file {fileio.file_sha256(tpath)})")
    L1 = int(man["seq_len"]) + 1
    dtype = np.dtype(man["dtype"])
    for rel, e in man_lib.files(man):
        n += 1
        p = root / rel
        if not p.exists():
            problems.append(f"{rel}: missing")
            continue
        digest = fileio.file_sha256(p)
        if digest != e["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (manifest {e['sha256']}, file {digest})")
            continue
        if not rel.endswith(".npy"):
            continue
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            problems.append(f"{rel}: unreadable ({err})")
            continue
        bad = _shape_problem(rel, a, e, L1, dtype)
        if bad:
            problems.append(bad)
    return n, problems


def main(argv=None):
    def body(args):
        n, problems = verify(args.workdir)
        for p in problems:
            print(f"bad: {p}", file=sys.stderr)
        if problems:
            raise DataError(f"{len(problems)} of {n} files failed verification against "
                            f"{man_lib.path(args.workdir)}")
        print(f"ok: {n} files match {man_lib.path(args.workdir)}")
    return cli.run(body, doc=__doc__.split("\n\n")[0], argv=argv,
                   flags=[cli.Flag("workdir", "run folder holding data/manifest.json",
                                   required=True)])


if __name__ == "__main__":
    raise SystemExit(main())
