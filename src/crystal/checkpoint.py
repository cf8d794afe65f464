"""Full-state orbax checkpoints: rolling recent ones plus permanent per-chunk releases.

Layout (one orbax CheckpointManager directory; step dirs are plain integers):

    WORKDIR/checkpoints/
      <step>/                     one finalized checkpoint
        state/                    the train-state pytree (OCDBT/zarr via tensorstore):
                                  params (float32, always), optimizer moments, step, rng key data
        data/metadata             JSON: the data loader's iterator state
        meta/metadata             JSON: config, data manifest sha256, stage, step, chunk,
                                  release flag, crystal version, git commit, wallclock
        _CHECKPOINT_METADATA      orbax's per-step record (commit timestamp, item handlers)
      <step>.orbax-checkpoint-tmp-<n>/   a save in flight (or killed): never restored, removed
                                  when a writer next opens the directory

Why: LLM360 released every intermediate checkpoint, but a rolling window is what a crashed
run needs. Retention is one orbax preservation policy: the latest `keep_recent` checkpoints
(of any kind) OR any step saved with `release=True`. The release flag lives in each
checkpoint's `meta` item, so it is written atomically with the checkpoint and survives restarts.

Atomicity: orbax writes a step into a temporary directory and renames it into place when
every item is committed; a process killed mid-save leaves only the tmp dir, which
`latest_step()` / `restore()` never see. Nothing goes through pickle: arrays are tensorstore,
the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from crystal import __version__, fileio
from crystal.errors import CheckpointError

ITEMS = ("state", "data", "meta")


class _QuietReadOnly(logging.Filter):
    """orbax warns twice whenever a manager opens read-only, which crystal does on purpose
    (--init_from, eval sweeps, releases, verify): keep those two lines out of the logs."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("CheckpointManagerOptions.read_only=True")
                    or msg.startswith("Given directory is read only"))


logging.getLogger("absl").addFilter(_QuietReadOnly())
CHECKPOINTS_SUBDIR = "checkpoints"




def checkpoint_dir(workdir) -> Path:
    """Where a run keeps its checkpoints: WORKDIR/checkpoints."""
    return Path(workdir) / CHECKPOINTS_SUBDIR


class _ReleaseSteps(ocp.checkpoint_managers.PreservationPolicy):
    """Preserves the steps saved as releases; a mutable set, since releases are decided
    while training (one per finished data chunk), not known up front like CustomSteps."""

    def __init__(self):
        self.steps: set[int] = set()

    def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
        return [c.step in self.steps for c in checkpoints]




def _json_item(name: str, value) -> dict:
    """A JSON round-trip copy, so a bad value fails here, not in orbax's writer thread."""
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint item {name!r}: must be a JSON object (dict), "
                              f"got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint item {name!r}: not JSON-serialisable: {e}") from e


def _is_params_leaf(path) -> bool:
    if not path:
        return False
    k = path[0]
    name = getattr(k, "key", getattr(k, "name", None))
    return name == "params"


def check_state(state) -> None:
    """Raises CheckpointError naming the leaf if the state cannot go to disk as-is.

    Params (the subtree under the top-level 'params' key/attribute) must be float32: LLM360's
    early Amber checkpoints were BF16 copies of FP32 masters, and that precision is gone for
    good. Typed PRNG keys must be passed as `jax.random.key_data(key)` (uint32).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    if not any(_is_params_leaf(p) for p, _ in leaves):
        raise CheckpointError("checkpoint state: no top-level 'params' entry")
    for path, x in leaves:
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            if isinstance(x, (int, float, np.number)):
                continue
            raise CheckpointError(f"checkpoint state leaf {jax.tree_util.keystr(path)}: "
                                  f"unsupported type {type(x).__name__}")
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise CheckpointError(f"checkpoint state leaf {jax.tree_util.keystr(path)}: typed "
                                  "PRNG key; save jax.random.key_data(key) instead")
        if _is_params_leaf(path) and jax.dtypes.issubdtype(dtype, np.floating) \
                and np.dtype(dtype) != np.float32:
            raise CheckpointError(f"checkpoint state leaf {jax.tree_util.keystr(path)}: params "
                                  f"must be float32 on disk, got {np.dtype(dtype).name}")


class Checkpointer:
    """One run's checkpoints: save (async), list, restore, retention of recents + releases.

    `read_only=True` opens someone else's checkpoints (`--init_from`) without ever deleting
    or cleaning anything there.
    """

    def __init__(self, directory, keep_recent: int = 3, async_save: bool = True,
                 read_only: bool = False):
        if not isinstance(keep_recent, int) or keep_recent < 1:
            raise CheckpointError(f"checkpoint.keep_recent: must be an integer >= 1, "
                                  f"got {keep_recent!r}")
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        self.read_only = read_only
        self._releases = _ReleaseSteps()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(n=keep_recent), self._releases])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,   # remove saves killed mid-write
            read_only=read_only,
            create=not read_only,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                               data=ocp.JsonCheckpointHandler(),
                               meta=ocp.JsonCheckpointHandler()))
        self._pending: int | None = None
        for step in self._mngr.all_steps():
            if self.read_meta(step).get("release"):
                self._releases.steps.add(step)

    # ------------------------------------------------------------------ listing

    def all_steps(self) -> list[int]:
        """Finalized checkpoint steps, ascending (a save still in flight is included)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def release_steps(self) -> list[int]:
        return sorted(s for s in self._releases.steps if s in set(self._mngr.all_steps()))

    def set_aside(self, step: int, dest) -> Path:
        """Moves one checkpoint out of the run into `dest/<step>` (nothing is deleted): a
        rollback sets aside the checkpoints of the timeline it abandons."""
        if self.read_only:
            raise CheckpointError(f"{self.directory}: opened read-only; cannot move")
        step = int(step)
        if step not in self._mngr.all_steps():
            raise CheckpointError(f"{self.directory}/{step}: no such checkpoint")
        self.wait()
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / str(step)
        if target.exists():
            target = dest / f"{step}.{len(list(dest.glob(f'{step}.*'))) + 1}"
        os.replace(Path(self.directory) / str(step), target)
        self._releases.steps.discard(step)
        self._mngr.reload()
        return target

    def reached_preemption(self, step: int) -> bool:
        """True once JAX's preemption sync point is reached (multi-host preemption notice)."""
        return self._mngr.reached_preemption(step)

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state, data_state: dict, meta: dict, release: bool = False,
             force: bool = False) -> bool:
        """Starts saving a checkpoint; returns once device arrays are copied to host.

        The write and the garbage collection of old steps continue in the background;
        `wait()` blocks until the checkpoint is on disk. `force=True` is the preemption path:
        it also blocks until the checkpoint is committed. Returns False (and writes nothing)
        when `step` is already checkpointed, e.g. the first step after a resume.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory}: opened read-only; cannot save")
        if self._pending is not None:   # surface a failed previous save before starting
            self.wait()
        step = int(step)
        check_state(state)
        data_state = _json_item("data", data_state)
        meta = _json_item("meta", meta)
        meta.update(step=step, release=bool(release))
        meta.setdefault("crystal_version", __version__)
        meta.setdefault("git_commit", fileio.git_commit()["commit"])
        meta.setdefault("wallclock", time.time())
        if step in self._mngr.all_steps():
            return False
        if release:   # before save: orbax picks the steps to delete as the save starts
            self._releases.steps.add(step)
        saved = self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        if saved:
            self._pending = step
        if force:
            self.wait()
        return bool(saved)

    def wait(self):
        """Blocks until the last save is committed; raises if it did not make it to disk."""
        self._mngr.wait_until_finished()
        if self._pending is not None:
            step, self._pending = self._pending, None
            if not _is_step_dir(self.directory / str(step)):
                self._mngr.reload()   # forget the step orbax listed but never committed
                raise CheckpointError(f"{self.directory}/{step}: checkpoint save failed; "
                                      "see the log above")

    def close(self):
        self.wait()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ restoring

    def _step_or_latest(self, step: int | None) -> int:
        steps = self._mngr.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no finalized checkpoint to restore")
            return max(steps)
        if int(step) not in steps:
            raise CheckpointError(f"{self.directory}/{step}: no such checkpoint "
                                  f"(have steps {sorted(steps)})")
        return int(step)

    def read_meta(self, step: int | None = None) -> dict:
        """The `meta` JSON of a checkpoint, without touching its arrays."""
        step = self._step_or_latest(step)
        return self._mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def abstract_state(self, step: int | None = None, sharding=None):
        """The saved state's shapes and dtypes as a ShapeDtypeStruct pytree.

        Every leaf gets `sharding` (default: the host CPU device, so it works on any
        topology). Optax namedtuples come back as lists/dicts; pass your own abstract state
        to `restore` to get the original structure back."""
        step = self._step_or_latest(step)
        sharding = sharding or jax.sharding.SingleDeviceSharding(_host_device())
        tree = self._mngr.item_metadata(step)["state"].tree
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)

    def restore_params(self, step: int | None = None):
        """(params, meta) of `step` (default: the latest), params only: the optimizer moments
        (twice the params' size) are never read. Arrays land on the host CPU device."""
        step = self._step_or_latest(step)
        target = {"params": self.abstract_state(step)["params"]}
        with ocp.PyTreeCheckpointer() as reader:
            state = reader.restore(
                self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        return state["params"], self.read_meta(step)

    def restore(self, step: int | None = None, abstract_state=None):
        """Returns (state, data_state, meta) of `step` (default: the latest).

        `abstract_state`: a pytree of jax.ShapeDtypeStruct with shardings (e.g.
        `jax.eval_shape` of the init + the mesh shardings); arrays are read straight into
        those shardings and the pytree structure (optax state classes) is kept. Without it,
        arrays land on the host CPU device, in nested dicts/lists (see abstract_state).
        """
        step = self._step_or_latest(step)
        target = abstract_state if abstract_state is not None else self.abstract_state(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]


def params_sha256(params) -> str:
    """The content hash of a param tree: sha256 over every leaf's path, dtype, shape and
    bytes, leaves in path order. Two checkpoints hash the same iff their params are equal
    bit for bit, whatever else (optimizer state, metadata) they hold."""
    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                          key=lambda px: jax.tree_util.keystr(px[0])):
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _host_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:   # JAX_PLATFORMS without cpu
        return jax.local_devices()[0]


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file() \
        and all((p / item).is_dir() for item in ITEMS)


def find_checkpoint(path) -> tuple[Path, int]:
    """Resolves `--init_from=PATH` to (checkpoints directory, step).

    PATH may be a workdir (uses WORKDIR/checkpoints, latest step), a checkpoints directory
    (latest step) or one step directory (that step). Raises a one-line CheckpointError
    naming PATH when nothing restorable is there.
    """
    p = Path(path).absolute()
    if _is_step_dir(p):
        return p.parent, int(p.name)
    for d in (p / CHECKPOINTS_SUBDIR, p):
        if d.is_dir():
            steps = [int(s.name) for s in d.iterdir() if _is_step_dir(s)]
            if steps:
                return d, max(steps)
    raise CheckpointError(f"{path}: no restorable checkpoint (expected WORKDIR, "
                          "WORKDIR/checkpoints or WORKDIR/checkpoints/<step> with a "
                          "finalized orbax checkpoint)")


def open_checkpoint(path) -> tuple[Checkpointer, int]:
    """A read-only Checkpointer and step for `--init_from=PATH` (see find_checkpoint)."""
    directory, step = find_checkpoint(path)
    return Checkpointer(directory, read_only=True), step
