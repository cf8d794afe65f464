"""Helper for tests/test_multihost.py: one process of a (possibly multi-process) tiny run.

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
    python tests/multihost_worker.py --workdir=W --run_dir=R --devices=2 --steps=4 \\
        [--stop_after=2] --out=OUT.json

Starts JAX's multi-controller runtime from the environment (crystal.sharding), builds the
mesh data=1 x fsdp=2 x tensor=2 over every process's devices, trains stage 1 of the tiny
CrystalCoder on the prepared data, each process feeding only its rows of each global batch
(StageLoader with this process's data_slice), checkpoints with orbax, and resumes from the
latest checkpoint if there is one. --stop_after=K saves at step K and exits (the "stop").
"""
import argparse
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--workdir", required=True)
ap.add_argument("--run_dir", required=True)
ap.add_argument("--devices", type=int, required=True)
ap.add_argument("--steps", type=int, required=True)
ap.add_argument("--stop_after", type=int, default=0)
ap.add_argument("--out", required=True)
ap.add_argument("--config_overrides", default="{}")
args = ap.parse_args()

os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from crystal import sharding  # noqa: E402

settings = sharding.initialize(sharding.distributed_settings({}, os.environ))

from crystal import checkpoint as ckpt_lib  # noqa: E402
from crystal import config as config_lib  # noqa: E402
from crystal import optim as optim_lib  # noqa: E402
from crystal import train as train_lib  # noqa: E402
from crystal.data.loader import StageLoader  # noqa: E402


def save_params(params, path):
    """Process 0 writes the full (gathered) params as .npz, no pickle."""
    params = multihost_utils.process_allgather(params, tiled=True)
    flat = {jax.tree_util.keystr(p).replace("']['", "/").strip("[']"): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if jax.process_index() == 0:
        np.savez(path, **flat)


def main():
    overrides = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2,
                 **json.loads(args.config_overrides)}
    cfg = config_lib.load("crystalcoder_tiny", overrides)
    mesh = sharding.make_mesh(cfg)
    B = int(cfg.train.global_batch_size)
    opt = optim_lib.make_optimizer(cfg, 1)
    init = lambda k: train_lib.init_state(cfg, k, opt)  # noqa: E731
    key = jax.random.key(cfg.seed)
    abstract = jax.eval_shape(init, key)
    shardings = sharding.state_shardings(abstract, cfg, mesh)
    bsh = sharding.batch_sharding(cfg, mesh)
    index, count = sharding.data_slice(bsh, B)
    loader = StageLoader(cfg, args.workdir, 1, index, count)
    step_fn = sharding.shard_train_step(
        train_lib.make_train_step(cfg, opt, num_sources=len(loader.group_names)),
        cfg, mesh, shardings)

    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(args.run_dir), async_save=False)
    start = ckpt.latest_step()
    if start is None:
        state, _ = sharding.create_sharded_state(init, cfg, mesh, key)
        start = 0
    else:
        target = sharding.abstract_with_shardings(abstract, shardings).to_dict()
        saved, data_state, _ = ckpt.restore(start, target)
        state = train_lib.TrainState.from_dict(saved)
        loader.set_state(data_state)
    assert loader.step == start, (loader.step, start)
    if start == 0:
        save_params(state.params, args.out + ".init.npz")

    record = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                  settings=settings.source, data_slice=[index, count], start=start,
                  losses=[], rows=[], local_rows=[])
    for step in range(start, args.steps):
        local = next(loader)
        record["rows"].append([int(i) for i in local["index"]])
        record["local_rows"].append(int(local["inputs"].shape[0]))
        feed = {k: local[k] for k in train_lib.STEP_KEYS if k in local}
        state, metrics = step_fn(state, sharding.global_batch(feed, bsh, B))
        record["losses"].append(float(metrics["loss"]))
        if args.stop_after and step + 1 == args.stop_after:
            ckpt.save(step + 1, state.to_dict(), loader.get_state(), meta={"stage": 1})
            ckpt.close()
            break
    else:
        ckpt.close()
    record["step"] = int(np.asarray(state.step.addressable_data(0)))
    save_params(state.params, args.out + ".params.npz")
    with open(args.out + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(args.out + ".tmp", args.out)
    loader.close()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
