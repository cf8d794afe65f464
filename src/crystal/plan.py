"""`python -m crystal.plan`: the memory and FLOP plan of a real run, without the hardware.

    python -m crystal.plan --config=configs/crystalcoder_7b.py \\
        --mesh=data=1,fsdp=64,tensor=1 --per_device_batch=3

Fakes as many CPU devices as the mesh needs (before JAX starts), then lowers and compiles
the real train step (crystal.train.make_train_step, sharded by crystal.sharding) ahead of
time from ShapeDtypeStructs: nothing of the model's size is ever allocated. Prints, per
device: params, optimizer state and batch bytes (from the shardings), XLA's memory analysis
of the partitioned program (arguments, outputs, aliased, temporaries), the activations
saved for the backward pass of one micro-batch (a separate compile of forward + vjp), the
FLOPs of one step and whether the peak fits each device.

Caveat: the numbers are XLA's *CPU* backend's view of the SPMD-partitioned per-device
program. GPU/TPU backends fuse and schedule differently (and keep bf16 where the CPU
backend may widen it), so treat temporaries as an estimate; params, optimizer state and
saved activations are layout facts and carry over.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from crystal import attention as attention_lib
from crystal import cli, fileio, sharding
from crystal import config as config_lib
from crystal import model as model_lib
from crystal import optim as optim_lib
from crystal import train as train_lib
from crystal.train import loss as loss_lib
from crystal.errors import UsageError

# Device memory (bytes) as the driver reports it; what a process can actually use is
# --usable_fraction of it (XLA_PYTHON_CLIENT_MEM_FRACTION, runtime, NCCL buffers).
DEVICES = {
    "a100-80gb": 81920 * 2**20,
    "h100-80gb": 81559 * 2**20,
    "h200": 143771 * 2**20,
    "tpu-v4": 32 * 2**30,
    "tpu-v5p": 95 * 2**30,
}

FLAGS = (
    cli.Flag("mesh", "AXIS=N,... for data, fsdp, tensor (default: the config's)", str, ""),
    cli.Flag("per_device_batch", "sequences per device per micro-batch; sets "
             "train.grad_accum (0: the config's grad_accum)", int, 0),
    cli.Flag("device", f"devices to check the fit on, some of {list(DEVICES)}", list,
             list(DEVICES)),
    cli.Flag("usable_fraction", "share of device memory a step may use", float, 0.9),
    cli.Flag("activations", "also compile forward+vjp to measure the activations saved for "
             "the backward pass", bool, True),
    cli.Flag("json_out", "also write the plan as JSON here", str, ""),
)


def _gib(n) -> str:
    return f"{n / 2**30:9.3f} GiB"


def _set_mesh(cfg, text: str):
    for k, v in sharding.parse_mesh_flag(text).items():
        cfg.mesh[k] = v


def _set_batch(cfg, per_device_batch: int, batch_shards: int):
    """grad_accum so that each micro-batch puts per_device_batch rows on every device."""
    gb = int(cfg.train.global_batch_size)
    micro = per_device_batch * batch_shards
    if gb % micro:
        raise UsageError(f"--per_device_batch={per_device_batch}: global batch {gb} is not a "
                        f"multiple of {per_device_batch} x {batch_shards} batch shards")
    cfg.train.grad_accum = gb // micro


def _tree_bytes(tree, shardings) -> int:
    sizes = jax.tree.map(lambda a, s: math.prod(s.shard_shape(tuple(a.shape)))
                         * np.dtype(a.dtype).itemsize, tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def _flops(cfg, batch_rows: int) -> float:
    """Global FLOPs of one micro-batch step, from XLA's cost analysis of the lowered HLO.

    XLA counts a while loop's body once, so the layer scan is unrolled at 1 and 2 layers
    and extrapolated linearly to num_layers: flops(L) = head + L x layer."""
    out = []
    for n in (1, 2):
        c = config_lib.from_json_dict(config_lib.to_json_dict(cfg))
        c.model.num_layers, c.model.scan_layers, c.train.grad_accum = n, False, 1
        c.train.global_batch_size = batch_rows
        opt = optim_lib.make_optimizer(c, 1)
        st = train_lib.abstract_state(c, opt)
        L = int(c.data.seq_len)
        b = {k: jax.ShapeDtypeStruct((batch_rows, L), d) for k, d in
             (("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32))}
        out.append(jax.jit(train_lib.make_train_step(c, opt)).lower(st, b)
                   .cost_analysis()["flops"])
    layer = out[1] - out[0]
    return out[0] - layer + int(cfg.model.num_layers) * layer


def plan(cfg, devices_to_check, usable_fraction: float, activations: bool = True) -> dict:

    mesh = sharding.make_mesh(cfg)
    n_dev = mesh.devices.size
    opt = optim_lib.make_optimizer(cfg, 1)
    abstract = train_lib.abstract_state(cfg, opt)
    sh = sharding.state_shardings(abstract, cfg, mesh)
    step = sharding.shard_train_step(train_lib.make_train_step(cfg, opt), cfg, mesh, sh)
    rows, L = int(cfg.train.global_batch_size), int(cfg.data.seq_len)
    bsh = step.batch_sharding
    batch = {k: jax.ShapeDtypeStruct((rows, L), d, sharding=bsh) for k, d in
             (("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32))}
    state = sharding.abstract_with_shardings(abstract, sh)

    t0 = time.time()
    lowered = step.lower(state, batch)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    mem = compiled.memory_analysis()

    params_b = _tree_bytes(abstract.params, sh.params)
    opt_b = _tree_bytes(abstract.opt_state, sh.opt_state)
    batch_b = _tree_bytes(batch, {k: bsh for k in batch})
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes \
        - mem.alias_size_in_bytes + mem.temp_size_in_bytes

    micro_rows = rows // int(cfg.train.grad_accum)
    act_b, t_act = None, 0.0
    if activations:
        act_b, t_act = _activation_bytes(cfg, mesh, abstract.params, sh.params, micro_rows, L)

    flops_micro = _flops(cfg, micro_rows)
    flops_step = flops_micro * int(cfg.train.grad_accum)
    n_params = model_lib.param_count(abstract.params)
    tokens = rows * L
    m = cfg.model
    # Model FLOPs: 6 x matmul params x tokens + causal-free attention scores and values
    # (the untied input embedding is a gather, not a matmul). XLA's count also holds the
    # forward recomputed by remat, so it is ~8/6 of this under remat='full'.
    matmul_params = n_params - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
    analytic = 6 * matmul_params * tokens + 12 * m.num_layers * m.d_model * L * tokens

    fits = {}
    for d in devices_to_check:
        fits[d] = dict(capacity=DEVICES[d], usable=int(DEVICES[d] * usable_fraction),
                       fits=bool(peak <= DEVICES[d] * usable_fraction))
    fallbacks = sharding.divisibility_fallbacks(cfg, mesh)
    return dict(
        fallbacks=fallbacks,
        config=cfg.name, mesh={a: int(mesh.shape[a]) for a in sharding.MESH_AXES},
        devices=int(n_dev), global_batch=rows, seq_len=L,
        grad_accum=int(cfg.train.grad_accum),
        per_device_batch=micro_rows // math.prod(mesh.shape[a] for a in
                                                 sharding.batch_axes(cfg, mesh)),
        remat=m.remat, compute_dtype=m.compute_dtype, params=n_params,
        attention=attention_lib.resolve(m.attention, m.compute_dtype,
                                        m.d_model // m.num_heads),
        loss_chunk=loss_lib.chunk_len(L, int(m.loss_chunk)),
        per_device=dict(params=params_b, optimizer=opt_b, batch=batch_b,
                        activations=act_b,
                        xla_arguments=int(mem.argument_size_in_bytes),
                        xla_outputs=int(mem.output_size_in_bytes),
                        xla_aliased=int(mem.alias_size_in_bytes),
                        xla_temporaries=int(mem.temp_size_in_bytes),
                        xla_generated_code=int(mem.generated_code_size_in_bytes),
                        peak=int(peak)),
        flops_per_step=float(flops_step), flops_per_step_per_device=float(flops_step / n_dev),
        analytic_flops_per_step=float(analytic),
        seconds=dict(lower=round(t1 - t0, 1), compile=round(t2 - t1, 1),
                     activations_compile=round(t_act, 1)),
        fits=fits, usable_fraction=usable_fraction,
        backend=jax.default_backend(),
    )


def _activation_bytes(cfg, mesh, params_abstract, params_sh, micro_rows, L):
    """Per-device bytes of what one micro-batch's forward saves for its backward (the vjp
    residuals, params excluded), from the shardings XLA chose for them."""
    bsh = sharding.batch_sharding(cfg, mesh, rows=micro_rows * int(cfg.train.grad_accum))
    p = sharding.abstract_with_shardings(params_abstract, params_sh)
    b = {k: jax.ShapeDtypeStruct((micro_rows, L), d, sharding=bsh) for k, d in
         (("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32))}

    def residuals(params, batch):
        _, vjp = jax.vjp(lambda q: train_lib.loss_sums(q, batch, cfg)[0], params)
        return jax.tree.leaves(vjp)

    t = time.time()
    with sharding.mesh_context(cfg, mesh):
        fn = jax.jit(residuals, in_shardings=(params_sh, bsh))
        shapes = jax.eval_shape(fn, p, b)
        compiled = fn.lower(p, b).compile()
    param_keys = {(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(params_abstract)}
    total = 0
    for x, s in zip(shapes, compiled.output_shardings):
        if (tuple(x.shape), np.dtype(x.dtype)) in param_keys:
            continue
        total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
    return int(total), time.time() - t


def report(p: dict) -> str:
    pd = p["per_device"]
    lines = [
        f"crystal.plan: {p['config']} ({p['params']:,} params) on {p['devices']} devices, "
        f"mesh data={p['mesh']['data']} fsdp={p['mesh']['fsdp']} tensor={p['mesh']['tensor']}",
        f"  batch {p['global_batch']} x {p['seq_len']} tokens = {p['grad_accum']} micro-batches"
        f" x {p['per_device_batch']} sequences per device; remat={p['remat']}, "
        f"compute {p['compute_dtype']}",
        f"  attention {p['attention']}, output projection + loss in chunks of "
        f"{p['loss_chunk']} positions",
        "  per device:",
        f"    params (float32)        {_gib(pd['params'])}",
        f"    optimizer state         {_gib(pd['optimizer'])}",
        f"    batch                   {_gib(pd['batch'])}",
    ]
    if pd["activations"] is not None:
        lines.append(f"    activations (1 micro)   {_gib(pd['activations'])}   "
                     "saved for backward (vjp residuals)")
    lines += [
        f"    XLA arguments           {_gib(pd['xla_arguments'])}",
        f"    XLA outputs             {_gib(pd['xla_outputs'])}   "
        f"(aliased with arguments: {_gib(pd['xla_aliased']).strip()})",
        f"    XLA temporaries         {_gib(pd['xla_temporaries'])}   "
        "activations + gradients + scratch",
        f"    peak (args+out-alias+temp) {_gib(pd['peak'])}",
        f"  FLOPs per step: {p['flops_per_step']:.4e} ({p['flops_per_step_per_device']:.4e} "
        f"per device, XLA, incl. remat)",
        f"  model FLOPs per step (6 N_matmul T + attention): {p['analytic_flops_per_step']:.4e}",
        f"  fits (usable = {p['usable_fraction']:.0%} of memory):",
    ]
    for d, f in p["fits"].items():
        lines.append(f"    {d:<10} {_gib(f['capacity'])}  {'FITS' if f['fits'] else 'DOES NOT FIT'}"
                     f"  ({pd['peak'] / f['usable']:.0%} of usable)")
    if p["fallbacks"]:
        lines.append(f"  divisibility rule kept {len(p['fallbacks'])} param dims whole, e.g.:")
        lines += [f"    {f}" for f in p["fallbacks"][:4]]
    s = p["seconds"]
    lines.append(f"  [{p['backend']} backend; lower {s['lower']} s, compile {s['compile']} s, "
                 f"activations compile {s['activations_compile']} s]")
    return "\n".join(lines)


def _fake_devices(n: int):
    """n CPU devices, before JAX starts: the plan never touches a real accelerator."""
    jax.config.update("jax_platforms", "cpu")    # read when the backend starts, not on import
    xf = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(xf + [f"--xla_force_host_platform_device_count={n}"])
    if jax.device_count() != n:   # the first device query starts the backend, with the flags
        raise UsageError(f"JAX already started with {jax.device_count()} devices; run "
                         "crystal.plan in a fresh process")


def _main(a):
    cfg = a.cfg
    if a.mesh:
        _set_mesh(cfg, a.mesh)
    for d in a.device:
        if d not in DEVICES:
            raise UsageError(f"--device: unknown device {d!r}; expected some of "
                             f"{list(DEVICES)}")
    _fake_devices(cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor)
    if a.per_device_batch:
        mesh = sharding.make_mesh(cfg)
        shards = math.prod(mesh.shape[x] for x in sharding.batch_axes(cfg, mesh))
        _set_batch(cfg, a.per_device_batch, shards)
    config_lib.validate(cfg)
    p = plan(cfg, a.device, a.usable_fraction, a.activations)
    print(report(p))
    if a.json_out:
        with fileio.atomic_open(a.json_out, "w") as f:
            json.dump(p, f, indent=2)


def main(argv=None):
    return cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_REQUIRED,
            argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
