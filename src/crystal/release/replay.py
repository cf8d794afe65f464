"""Replay certificates: release checkpoint k, trained on the first N batches of data chunk
k+1 read from the bundle's own files, gives these losses and these params.

    certificates/<step>.json   {"checkpoint", "next_chunk", "steps", "start_params_sha256",
                                "losses", "end_params_sha256", "device", "matches_training"}

Why: a hash proves the files are the ones published; a certificate proves they are the
ones that were trained on, and that the checkpoint is the state they were trained from: an
outsider with nothing but the bundle and crystal re-runs the steps and gets the same bits
(on the CPU kind that wrote the certificate; across CPU kinds the losses agree to about
1e-6 relative, the params hashes do not, see docs/release.md). At export time the losses are
also compared with the run's own metrics, which proves the exported rows are the trained
rows (`matches_training`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import jax
import numpy as np

from crystal import checkpoint as ckpt_lib
from crystal import config as config_lib
from crystal import optim as optim_lib
from crystal.data import loader as loader_lib
from crystal.data.chunks import files as chunk_files
from crystal.release.manifest import BundleError
from crystal.train import step as step_lib


def params_sha256(params) -> str:
    """sha256 over every param leaf's float32 bytes, in tree order (paths included)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


def read_batches(chunk_path: Path, groups: list[str], batch_size: int, n: int):
    """The first n global batches of a released chunk file, as the training step takes
    them (inputs, targets, loss mask, segment ids, source ids), built with the loader's own
    `make_example`, so every field is what the loader fed."""
    with open(chunk_path, encoding="utf-8") as f:
        for b in range(n):
            lines = list(itertools.islice(f, batch_size))
            if len(lines) < batch_size:
                raise BundleError(f"{chunk_path}: {b * batch_size + len(lines)} rows, "
                                  f"{n * batch_size} needed for {n} batches")
            yield loader_lib.collate([_example(json.loads(x), groups) for x in lines])


def _example(row: dict, groups: list[str]) -> dict:
    toks_T = np.asarray(row[chunk_files.ROW_FIELDS[0]], np.int32)
    num_valid = min(int(sum(row["loss_mask"])) + 1, len(toks_T))   # make_example's inverse
    g = groups.index(row["source"])
    shard = int(str(row["shard"]).rsplit(":", 1)[1])
    rec = dict(group=g, component=-1, shard=shard, row=int(row["row"]),
               epoch=int(row["epoch"]), index=int(row["index"]),
               substituted=int(row["substituted"]))
    return loader_lib.make_example(toks_T, num_valid, rec, int(row["fim"]))


def certify(cfg, ckpt_dir: Path, step: int, chunk_path: Path, chunk: dict,
            groups: list[str], n: int, enter_stage: bool) -> dict:
    """Restores checkpoint `step`, trains n steps on `chunk`'s first batches, and returns
    the certificate. `enter_stage`: the chunk opens a new stage (its schedule restarts)."""
    opt = optim_lib.make_optimizer(cfg, 1)
    abstract = step_lib.abstract_state(cfg, opt)
    with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ck:
        st, _, meta = ck.restore(step, jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract.to_dict()))
    state = step_lib.TrainState.from_dict(st)
    if enter_stage:   # the chunk opens a stage: the boundary as the loop applies it
        if config_lib.stage(cfg, int(chunk["stage"])).init == "scratch":
            raise BundleError(f"stage {chunk['stage']} starts from scratch; no certificate "
                              "crosses into it")
        state = step_lib.enter_stage(cfg, int(chunk["stage"]), state,
                                     lambda: step_lib.init_state(cfg, jax.random.key(0), opt))
    start = params_sha256(state.params)
    train_step = jax.jit(step_lib.make_train_step(cfg, opt, len(groups)))
    losses = []
    for batch in read_batches(chunk_path, groups, int(cfg.train.global_batch_size), n):
        batch["poison"] = np.zeros(batch["inputs"].shape[0], np.float32)
        state, m = train_step(state, batch)
        losses.append(float(m["loss"]))
    return dict(checkpoint=int(step), next_chunk=int(chunk["chunk"]), steps=n,
                start_params_sha256=start, losses=losses,
                end_params_sha256=params_sha256(state.params),
                device=f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}")
