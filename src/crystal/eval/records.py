"""Eval records: one JSON file per (checkpoint, task, settings), with their provenance.

    WORKDIR/evals/
      TASK/SETTINGS_ID/settings.json        the task's settings and seed, in the clear
      TASK/SETTINGS_ID/step_00000120.json   one record
      TASK/SETTINGS_ID/superseded/          records of a checkpoint since saved again
      *.png, *.csv                          the figures and tables (crystal.eval.figures)

SETTINGS_ID is the first 12 hex digits of sha256({task, settings, seed}): a sweep with other
settings writes beside, never over, earlier records. A record (FORMAT 1):

    format, task, status ('ok', or 'empty' when there was nothing to measure), step,
    checkpoint  {step, path, stage, stage_step, release, meta_sha256, params_sha256},
    run         {config_name, fingerprint, data_sha256},
    settings, seed, settings_sha256,
    inputs      (the task's: eval-set and data-chunk hashes),
    code        {crystal_version, commit, dirty},
    metrics     {name: float}, result (the task's detail).

No timestamps or timings: re-evaluating a checkpoint writes the same bytes, so a killed
sweep re-run, or two shards, give exactly the records of one uninterrupted sweep. A record
is written whole or not at all (fileio.write_json).
"""

from __future__ import annotations

import os
from pathlib import Path

from crystal import __version__, fileio
from crystal.errors import CrystalError
from crystal.eval.tasks import Checkpoint, Result, slug

FORMAT = 1
EVALS_SUBDIR = "evals"


def evals_dir(workdir) -> Path:
    return Path(workdir) / EVALS_SUBDIR


def settings_sha256(task: str, settings: dict, seed: int) -> str:
    return fileio.json_sha256(dict(task=task, settings=settings, seed=int(seed)))


def task_dir(workdir, task: str, settings: dict, seed: int) -> Path:
    """Where the records of `task` at these settings and seed live."""
    return evals_dir(workdir) / slug(task) / settings_sha256(task, settings, seed)[:12]


def record_path(directory: Path, step: int) -> Path:
    return directory / f"step_{int(step):08d}.json"


def read(path: Path) -> dict | None:
    """The record at `path`, or None if there is none."""
    if not path.exists():
        return None
    return fileio.read_json(path, CrystalError)


def is_current(rec: dict | None, ckpt: Checkpoint) -> bool:
    """Does `rec` describe this very checkpoint (not one saved earlier at its step)?"""
    return bool(rec) and rec.get("format") == FORMAT and \
        rec["checkpoint"]["meta_sha256"] == ckpt.meta_sha256


def set_aside(path: Path, rec: dict):
    """Moves a record of an earlier checkpoint at the same step out of the way (never
    deleted): `superseded/step_N.<its meta hash>.json`."""
    dest = path.parent / "superseded" / f"{path.stem}.{rec['checkpoint']['meta_sha256'][:12]}"\
        ".json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)


def make(task: str, ckpt: Checkpoint, workdir, params_sha256: str, run: dict,
         settings: dict, seed: int, result: Result) -> dict:
    commit = fileio.git_commit()
    return dict(
        format=FORMAT, task=task, status="ok" if result.metrics else "empty",
        step=ckpt.step,
        checkpoint=dict(step=ckpt.step, path=os.path.relpath(ckpt.path, workdir),
                        stage=ckpt.stage, stage_step=ckpt.stage_step,
                        release=bool(ckpt.meta.get("release")),
                        meta_sha256=ckpt.meta_sha256, params_sha256=params_sha256),
        run=run, settings=settings, seed=int(seed),
        settings_sha256=settings_sha256(task, settings, seed), inputs=result.inputs,
        code=dict(crystal_version=__version__, commit=commit["commit"],
                  dirty=commit["dirty"]),
        metrics=result.metrics, result=result.body)


def write(directory: Path, rec: dict):
    """Writes the record (and, once, the directory's settings.json), each atomically."""
    settings_file = directory / "settings.json"
    if not settings_file.exists():
        fileio.write_json(settings_file, dict(task=rec["task"], settings=rec["settings"],
                                              seed=rec["seed"]), sort_keys=True)
    fileio.write_json(record_path(directory, rec["step"]), rec, sort_keys=True)


def read_all(directory: Path) -> list[dict]:
    """Every record in `directory`, ascending step."""
    recs = [fileio.read_json(p, CrystalError) for p in sorted(directory.glob("step_*.json"))]
    return sorted(recs, key=lambda r: r["step"])
