"""Verifies a release bundle with nothing but the bundle and crystal.

    python -m crystal.release.verify BUNDLE [--replay=N] [--shard=I/N] [--expect_id=ID]

1. Every file is re-hashed against MANIFEST.sha256 (a missing, added, changed or truncated
   file is one line naming it).
2. The pieces agree: each index row's checkpoint metadata (step, stage, stage step, tokens
   seen), the data chunks' index (stage, step range, rows = steps x batch, tokens per
   source adding up, loss tokens equal to the tokens seen between consecutive checkpoints)
   and the ledger's stage boundaries.
3. With --replay=N, each replay certificate is re-run: the checkpoint, the first N batches
   of the next data chunk from the bundle's own files, the same losses (bitwise on the CPU
   kind that wrote the certificate, 1e-6 relative elsewhere) and the same params hash.

--shard=I/N splits the file hashes and the replays over N hosts with no coordination (a
file or certificate belongs to shard I when the hash of its path is I mod N); checks 2 run
on every shard (they read only small files).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax

from crystal import checkpoint as ckpt_lib
from crystal import cli, fileio
from crystal import config as config_lib
from crystal.data import manifest as data_manifest
from crystal.data.chunks import files as chunk_files
from crystal.release import index as index_lib
from crystal.release import manifest, replay
from crystal.release.manifest import BundleError
from crystal.errors import UsageError

LOSS_RTOL = 1e-6    # across CPU kinds (XLA's float32 reductions differ in order)


def parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = str(text).partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        raise UsageError(f"--shard={text}: expected I/N, e.g. 0/4") from None
    if not sep or n <= 0 or not 0 <= i < n:
        raise UsageError(f"--shard={text}: expected I/N with 0 <= I < N")
    return i, n


def verify(bundle, replay_steps: int = 0, shard=(0, 1), expect_id: str = "") -> dict:
    """Checks 1-3 of the module docstring; raises BundleError naming what disagrees.
    `expect_id`: the bundle id as published elsewhere (it covers MANIFEST.sha256 itself)."""
    root = Path(bundle)
    if expect_id and manifest.bundle_id(root) != expect_id:
        raise BundleError(f"{root / manifest.MANIFEST}: sha256 {manifest.bundle_id(root)} is "
                          f"not the published bundle id {expect_id}")
    n_files = manifest.check(root, shard)
    idx = fileio.read_json(root / "index.json", BundleError)
    if idx.get("format") != index_lib.FORMAT:
        raise BundleError(f"{root / 'index.json'}: field format: {idx.get('format')!r} is "
                          f"not {index_lib.FORMAT} (a bundle of another crystal version)")
    cfg = config_lib.from_json_dict(fileio.read_json(root / "config" / "config.json",
                                                     BundleError),
                                    where=str(root / "config" / "config.json"))
    chunks = _check_chunks(root, idx, cfg)
    _check_rows(root, idx, chunks)
    _check_ledger(root, idx)
    replayed = _replay(root, idx, cfg, replay_steps, shard) if replay_steps > 0 else 0
    return dict(bundle_id=manifest.bundle_id(root), files=n_files, rows=len(idx["rows"]),
                chunks=len(chunks), replayed=replayed)


def _check_chunks(root: Path, idx: dict, cfg) -> dict[int, dict]:
    where = root / "data" / "chunks" / chunk_files.INDEX
    cidx = chunk_files.read_index(root / "data" / "chunks")
    by_num = {c["chunk"]: c for c in cidx["chunks"]}
    B, T = int(cfg.train.global_batch_size), int(cidx["seq_len"]) + 1
    for c in idx["chunks"]:
        e = by_num.get(c["number"])
        if e is None:
            raise BundleError(f"{where}: no data chunk {c['number']} (index.json lists it)")
        if [e["stage"], e["index"], list(e["steps"])] != [c["stage"], c["index"], c["steps"]]:
            raise BundleError(f"{where}: chunk {c['number']} is stage {e['stage']} index "
                              f"{e['index']} steps {e['steps']}; index.json says stage "
                              f"{c['stage']} index {c['index']} steps {c['steps']}")
        want_rows = (c["steps"][1] - c["steps"][0]) * B
        if e["num_rows"] != want_rows or e["num_tokens"] != want_rows * T or \
                sum(e["tokens_per_source"].values()) != e["num_tokens"]:
            raise BundleError(f"{where}: chunk {c['number']} has {e['num_rows']} rows and "
                              f"{e['num_tokens']} tokens; its {c['steps'][1] - c['steps'][0]}"
                              f" steps of {B} rows x {T} tokens need {want_rows} and "
                              f"{want_rows * T}, and the tokens per source must add up")
    return by_num


def _check_rows(root: Path, idx: dict, chunks: dict[int, dict]):
    ck_dir = root / "checkpoints"
    prev = None
    with ckpt_lib.Checkpointer(ck_dir, read_only=True) as ck:
        for row in idx["rows"]:
            m = ck.read_meta(row["step"])
            got = (int(m["step"]), int(m["stage"]), int(m["stage_step"]),
                   int(m.get("tokens_seen", 0)))
            want = (row["step"], row["stage"], row["stage_step"], row["tokens_seen"])
            if got != want:
                raise BundleError(f"{ck_dir / str(row['step'])}: metadata (step, stage, stage "
                                  f"step, tokens seen) {got}; index.json says {want}")
            num = row.get("data_chunk")
            if num is not None and prev is not None and prev.get("data_chunk") == num - 1:
                gained = row["tokens_seen"] - prev["tokens_seen"]
                if gained != chunks[num]["num_loss_tokens"]:
                    raise BundleError(
                        f"{root / row['chunk_file']}: {chunks[num]['num_loss_tokens']} "
                        f"trained tokens, but the checkpoints around it saw {gained}")
            prev = row


def _check_ledger(root: Path, idx: dict):
    """A released checkpoint ends its stage exactly when the ledger has a stage_end there."""
    events = fileio.read_json(root / "ledger.json", BundleError)
    ends = {e["step"] for e in events if e.get("event") == "stage_end"}
    for r in idx["rows"]:
        final = r["stage_step"] == _stage_steps(idx, r["stage"])
        if final != (r["step"] in ends):
            raise BundleError(f"{root / 'ledger.json'}: {'no' if final else 'a'} stage_end "
                              f"event at step {r['step']}, where index.json's stage "
                              f"{r['stage']} {'ends' if final else 'goes on'}")


def _stage_steps(idx: dict, stage: int) -> int:
    return next(s["steps"] for s in idx["stages"] if s["stage"] == stage)


def _replay(root: Path, idx: dict, cfg, n: int, shard) -> int:
    groups = data_manifest.group_names(fileio.read_json(root / "data" / "manifest.json",
                                                        BundleError))
    cidx = {c["chunk"]: c for c in chunk_files.read_index(root / "data" / "chunks")["chunks"]}
    here = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
    done = 0
    for row in idx["rows"]:
        if not row.get("certificate") or manifest.shard_of(row["certificate"], shard[1]) \
                != shard[0]:
            continue
        cert = fileio.read_json(root / row["certificate"], BundleError)
        e = cidx[cert["next_chunk"]]
        k = min(n, int(cert["steps"]))
        got = replay.certify(cfg, root / "checkpoints", row["step"],
                             root / "data" / "chunks" / e["path"], e, groups, k,
                             enter_stage=e["steps"][0] == 0)
        _compare(root / row["certificate"], cert, got, k, same_device=cert["device"] == here)
        done += 1
    return done


def _compare(path: Path, cert: dict, got: dict, k: int, same_device: bool):
    if got["start_params_sha256"] != cert["start_params_sha256"]:
        raise BundleError(f"{path}: the checkpoint's params hash {got['start_params_sha256']}"
                          f" is not the certified {cert['start_params_sha256']}")
    for i, (a, b) in enumerate(zip(got["losses"], cert["losses"][:k])):
        ok = a == b if same_device else math.isclose(a, b, rel_tol=LOSS_RTOL)
        if not ok:
            raise BundleError(f"{path}: replayed step {i + 1} loss {a!r}, certified {b!r}")
    if same_device and k == int(cert["steps"]) and \
            got["end_params_sha256"] != cert["end_params_sha256"]:
        raise BundleError(f"{path}: params after {k} replayed steps hash to "
                          f"{got['end_params_sha256']}, certified {cert['end_params_sha256']}")


FLAGS = (
    cli.Flag("bundle", "the release bundle directory", positional=True, required=True),
    cli.Flag("replay", "also re-run N certified steps per release checkpoint", int, 0),
    cli.Flag("shard", "verify share I of N (files and replays), e.g. 0/4", str, "0/1"),
    cli.Flag("expect_id", "the published bundle id (checks MANIFEST.sha256 itself)", str, ""),
)


def main(argv=None):
    def body(a):
        out = verify(a.bundle, a.replay, parse_shard(a.shard), a.expect_id)
        print(f"ok: bundle {out['bundle_id']}: {out['files']} files re-hashed, "
              f"{out['rows']} checkpoints and {out['chunks']} data chunks agree, "
              f"{out['replayed']} certificates replayed")
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=FLAGS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
