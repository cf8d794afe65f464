"""Writes a release bundle from a run's workdir (the layout is docs/release.md).

Every piece is copied or derived from the workdir, never reconstructed: checkpoints as
orbax wrote them, the data chunks by the replay-based export, metrics, evals and the ledger
as the run wrote them. The bundle is assembled in a temporary sibling and renamed into
place whole; re-running on the same workdir writes the same bytes (nothing the release
adds carries a timestamp), so the same run always has the same bundle id.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from crystal import checkpoint as ckpt_lib
from crystal import config as config_lib
from crystal import fileio
from crystal.data import manifest as data_manifest
from crystal.data.chunks import export as chunk_export
from crystal.data.chunks import files as chunk_files
from crystal.data.chunks import numbering
from crystal.errors import ConversionError, CrystalError
from crystal.interop import cerebras, hf
from crystal.metrics import writers
from crystal.release import card, index, manifest, replay
from crystal.release.manifest import BundleError
from crystal.train import RUN_FILE, ledger

FORMAT = 1
HF_CHOICES = ("all", "final", "none")


@dataclasses.dataclass
class Run:
    """What a release needs to know about a workdir, read once (nothing written)."""
    workdir: Path
    cfg: object
    run: dict                    # run.json
    metas: dict                  # step -> checkpoint meta, for the steps released
    latest: int
    finished: bool
    chunks: list                 # numbering.DataChunk, the fully trained ones
    chunk_end: dict              # data chunk number -> global step of its release checkpoint


def inspect(workdir, steps: str = "release", partial: bool = False) -> Run:
    """The run behind `workdir`, checked: an unfinished run (unless `partial`), steps that
    are not checkpoints, a workdir that is not a run are one-line BundleErrors."""
    workdir = Path(workdir)
    rec = fileio.read_json(workdir / RUN_FILE, BundleError, missing="not a crystal run "
                           "directory: crystal.train writes run.json")
    cfg = config_lib.from_json_dict(rec["config"], where=str(workdir / RUN_FILE))
    d = ckpt_lib.checkpoint_dir(workdir)
    try:
        ck = ckpt_lib.Checkpointer(d, read_only=True)
    except ckpt_lib.CheckpointError:
        raise BundleError(f"{d}: no checkpoints to release") from None
    with ck:
        all_steps, releases = ck.all_steps(), ck.release_steps()
        if not all_steps:
            raise BundleError(f"{d}: no checkpoints to release")
        latest = all_steps[-1]
        last_meta = ck.read_meta(latest)
        chosen = _chosen(steps, all_steps, releases, d)
        metas = {s: ck.read_meta(s) for s in chosen}
    n_stages = len(config_lib.stage_names(cfg))
    finished = int(last_meta["stage"]) == n_stages and bool(last_meta.get("stage_done"))
    if not finished and not partial:
        raise BundleError(
            f"{workdir}: the run is unfinished (stage {last_meta['stage']} of {n_stages} "
            f"{'finished' if last_meta.get('stage_done') else 'in progress'} at step "
            f"{latest}); finish it, or release what exists with --partial")
    ends = _chunk_ends(cfg)
    trained = [c for c in numbering.chunks(cfg) if ends[c.number] <= latest]
    return Run(workdir, cfg, rec, metas, latest, finished, trained, ends)


def _chosen(steps: str, all_steps, releases, d) -> list[int]:
    if steps == "release":
        return list(releases)
    if steps == "all":
        return list(all_steps)
    try:
        want = sorted({int(s) for s in steps.split(",") if s.strip()})
    except ValueError:
        raise BundleError(f"--steps={steps}: expected release, all or STEP,STEP,...") from None
    missing = [s for s in want if s not in all_steps]
    if missing:
        raise BundleError(f"--steps={steps}: {d} has no checkpoint {missing[0]} (has "
                          f"{all_steps})")
    return want


def _chunk_ends(cfg) -> dict[int, int]:
    """Data chunk number -> the global step at its end (its release checkpoint)."""
    offset, out = {}, {}
    for s in range(1, len(config_lib.stage_names(cfg)) + 1):
        offset[s] = sum(numbering.stage_steps(cfg, i) for i in range(1, s))
    for c in numbering.chunks(cfg):
        out[c.number] = offset[c.stage] + c.end_step
    return out


def write(workdir, out, steps: str = "release", hf_export: str = "final",
          hf_layout: str = "auto", partial: bool = False, replay_steps: int = 2) -> dict:
    """Writes the bundle `out` (which must not exist); returns its summary."""
    if hf_export not in HF_CHOICES:
        raise BundleError(f"--hf={hf_export}: expected one of {HF_CHOICES}")
    r = inspect(workdir, steps, partial)
    with fileio.atomic_dir(out) as tmp:
        digests = _checkpoints(r, tmp)
        digests.update(_data(r, tmp))
        notes = _config(r, tmp) + _hf(r, tmp, hf_export, hf_layout) + _copies(r, tmp)
        certs = _certificates(r, tmp, replay_steps)
        idx = index.build(r, certs, notes)
        index.write(tmp, idx)
        card.write(tmp / "README.md", r, idx)
        rest = sorted(set(manifest.files_under(tmp)) - set(digests))
        digests.update(manifest.hash_files(tmp, rest))
        bundle_id = manifest.write(tmp, digests)
    return dict(out=str(out), bundle_id=bundle_id, files=len(digests) + 1,
                checkpoints=sorted(r.metas), chunks=len(r.chunks), certificates=len(certs),
                notes=notes, finished=r.finished)


def _checkpoints(r: Run, tmp: Path) -> dict[str, str]:
    src = ckpt_lib.checkpoint_dir(r.workdir)
    out = {}
    for s in sorted(r.metas):
        out.update(manifest.copy_tree(src / str(s), tmp / "checkpoints" / str(s),
                                      f"checkpoints/{s}"))
    return out


def _data(r: Run, tmp: Path) -> dict[str, str]:
    """data/chunks (the export: one file per data chunk), the tokenizer, the data manifest
    and the preparation log; the chunk files' hashes come from the export's own pass."""
    dd = data_manifest.data_dir(r.workdir)
    idx = chunk_export.export(r.cfg, r.workdir, tmp / "data" / "chunks", r.chunks)
    for name in (data_manifest.FILE, "prepare_log.json", data_manifest.SOURCES_FILE):
        if (dd / name).is_file():
            shutil.copyfile(dd / name, tmp / "data" / name)
    return {f"data/chunks/{c['path']}": c["sha256"] for c in idx["chunks"]}


def _config(r: Run, tmp: Path) -> list[str]:
    """config/: the crystal config, a Cerebras params.yaml per stage (or why not), the code
    commits and the package list the run recorded."""
    c = tmp / "config"
    fileio.write_json(c / "config.json", config_lib.to_json_dict(r.cfg), sort_keys=True)
    notes = []
    for s in range(1, len(config_lib.stage_names(r.cfg)) + 1):
        try:
            cerebras.export_stage(r.cfg, s, c / f"params_stage_{s}.yaml")
        except (ConversionError, CrystalError) as e:
            notes.append(f"config/params_stage_{s}.yaml: not written: {e}")
    commits = sorted({m.get("git_commit", "") for m in r.metas.values()} - {""})
    fileio.write_json(c / "code.json", dict(run_commits=commits,
                                           environment=r.run.get("environment", {})),
                      sort_keys=True)
    pkgs = r.run.get("environment", {}).get("packages")
    if pkgs:
        with fileio.atomic_open(c / "pip_freeze.txt", "w") as f:
            f.write("".join(p + "\n" for p in pkgs))
    else:
        notes.append("config/pip_freeze.txt: not written: run.json records no packages "
                     "(a run from before crystal recorded its environment)")
    return notes


def _hf(r: Run, tmp: Path, which: str, layout: str) -> list[str]:
    steps = [] if which == "none" else sorted(r.metas)[-1:] if which == "final" \
        else sorted(r.metas)
    notes = []
    for s in steps:
        try:
            hf.export(ckpt_lib.checkpoint_dir(r.workdir) / str(s), tmp / "hf" / str(s),
                      layout)
        except ConversionError as e:
            notes.append(f"hf/{s}: not written: {e}")
    return notes


def _copies(r: Run, tmp: Path) -> list[str]:
    """metrics/, evals/ and ledger.json, as the run wrote them; notes on what is missing."""
    wd = r.workdir
    for name in ("metrics.jsonl", "loss.png"):
        if (wd / name).is_file():
            (tmp / "metrics").mkdir(exist_ok=True)
            shutil.copyfile(wd / name, tmp / "metrics" / name)
    notes = []
    if (wd / "evals").is_dir():
        shutil.copytree(wd / "evals", tmp / "evals")
    else:
        notes.append("evals/: none: the run has no eval records (python -m crystal.eval "
                     "before the release adds them)")
    fileio.write_json(tmp / "ledger.json", ledger.read(wd))
    if not (tmp / "metrics" / "metrics.jsonl").is_file():
        raise BundleError(f"{wd / 'metrics.jsonl'}: missing; a release needs the run's metrics")
    writers.read_jsonl(tmp / "metrics" / "metrics.jsonl")    # a corrupt file fails here
    return notes


def _certificates(r: Run, tmp: Path, n: int) -> dict[int, dict]:
    """A replay certificate for every released checkpoint that ends a data chunk whose
    successor is in the bundle (crystal.release.replay)."""
    if n <= 0:
        return {}
    by_end = {end: num for num, end in r.chunk_end.items()}
    chunk_idx = chunk_files.read_index(tmp / "data" / "chunks")
    entries = {c["chunk"]: c for c in chunk_idx["chunks"]}
    groups = data_manifest.group_names(data_manifest.read(r.workdir)[0])
    losses = {x["step"]: x["loss"] for x in writers.read_jsonl(r.workdir / "metrics.jsonl")
              if "loss" in x}
    out = {}
    for step in sorted(r.metas):
        nxt = by_end.get(step, -1) + 1 if step in by_end else None
        if nxt is None or nxt not in entries:
            continue
        e = entries[nxt]
        k = min(n, e["steps"][1] - e["steps"][0])
        cert = replay.certify(r.cfg, ckpt_lib.checkpoint_dir(r.workdir), step,
                              tmp / "data" / "chunks" / e["path"], e, groups, k,
                              enter_stage=e["steps"][0] == 0)
        trained = [losses.get(step + i + 1) for i in range(k)]
        cert["matches_training"] = trained == cert["losses"]
        fileio.write_json(tmp / "certificates" / f"{step}.json", cert, sort_keys=True)
        out[step] = cert
    return out
