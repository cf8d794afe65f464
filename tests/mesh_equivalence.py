"""Helper for tests/test_sharding.py: train a tiny config a few steps on one device and on
several meshes of 8 fake CPU devices, and write what the test compares as JSON.

    python tests/mesh_equivalence.py CONFIG OUT.json 8,1,1 1,8,1 ...

Runs in its own process so the device count and XLA's (cheaper) CPU optimisation level are
set before JAX starts, and all meshes share one JAX start-up.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from crystal import config as config_lib  # noqa: E402
from crystal import optim as optim_lib  # noqa: E402
from crystal import sharding  # noqa: E402
from crystal import train as train_lib  # noqa: E402

STEPS = 3
# Adam's first steps are ~lr * sign(g): an entry whose gradient is within float noise of 0
# (a reduction summed in another order differs by ~1e-8) can flip sign and move by ~2 lr.
# A larger Adam eps (1e-5, vs ~1e-8 noise) turns those entries' updates into lr * g / eps,
# so the noise stays ~1e-6 below the 1e-5 tolerance, while a sharding bug (a missing or
# doubled reduction) still moves params by ~lr = 1e-3 and changes the losses.
OVERRIDES = {"train.global_batch_size": 8, "stages.stage_1.schedule.peak_lr": 1e-3,
             "stages.stage_1.schedule.warmup_steps": 2, "optim.eps": 1e-5}


def batches(cfg):
    rng = np.random.default_rng(0)
    B, L, V = cfg.train.global_batch_size, cfg.data.seq_len, cfg.tokenizer.vocab_size
    out = []
    for _ in range(STEPS):
        toks = rng.integers(0, V, (B, L + 1)).astype(np.int32)
        mask = (rng.random((B, L)) > 0.1).astype(np.float32)
        out.append(dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=mask))
    return out


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(name, out_path, meshes):
    cfg = config_lib.load(name, OVERRIDES)
    opt = optim_lib.make_optimizer(cfg, 1)
    step = train_lib.make_train_step(cfg, opt)
    init = lambda k: train_lib.init_state(cfg, k, opt)  # noqa: E731
    key = jax.random.key(cfg.seed)
    data = batches(cfg)

    # Reference: plain single-device jit, no crystal.sharding involved.
    ref0 = jax.jit(init)(key)
    state, ref_losses = ref0, []
    ref_step = jax.jit(step)
    for b in data:
        state, m = ref_step(state, b)
        ref_losses.append(float(m["loss"]))
    ref = dict(params=flat(state.params), mu=flat(state.opt_state[1].mu),
               nu=flat(state.opt_state[1].nu))
    ref_init = flat(ref0.params)
    ref0_host = jax.device_get(ref0)   # fresh device buffers per mesh: the step donates them

    results = {"reference": dict(losses=ref_losses), "meshes": {}}
    for i, text in enumerate(meshes):
        shape = tuple(int(x) for x in text.split(","))
        c = config_lib.load(name, OVERRIDES)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
        mesh = sharding.make_mesh(c, jax.devices()[:int(np.prod(shape))])
        if i == 0:   # created sharded: must give the same bits as the unsharded init
            s, sh = sharding.create_sharded_state(init, c, mesh, key)
            init_diff = max(float(np.max(np.abs(a - ref_init[k])))
                            for k, a in flat(s.params).items())
        else:
            sh = sharding.state_shardings(jax.eval_shape(init, key), c, mesh)
            s, init_diff = jax.device_put(ref0_host, sh), None
        fn = sharding.shard_train_step(step, c, mesh, sh, donate=True)
        losses = []
        for b in data:
            s, m = fn(s, {k: jax.device_put(v, fn.batch_sharding) for k, v in b.items()})
            losses.append(float(m["loss"]))
        got = dict(params=flat(s.params), mu=flat(s.opt_state[1].mu),
                   nu=flat(s.opt_state[1].nu))
        diffs = {part: max(float(np.max(np.abs(a - ref[part][k]))) for k, a in got[part].items())
                 for part in got}
        shards = {}
        for part, tree in (("params", s.params), ("mu", s.opt_state[1].mu)):
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
                shapes = {tuple(sh_.data.shape) for sh_ in x.addressable_shards}
                assert len(shapes) == 1, (p, shapes)
                shards[f"{part}{jax.tree_util.keystr(p)}"] = list(shapes.pop())
        results["meshes"][text] = dict(losses=losses, diffs=diffs, init_diff=init_diff,
                                       shards=shards, devices=len(mesh.devices.flat))
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
