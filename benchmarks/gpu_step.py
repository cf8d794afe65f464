"""`train_step.py --device=gpu`: 7B-width layers on one accelerator at the largest batch that
fits, MFU against the device's bf16 peak, and whether attention ran as a fused kernel.

One prepared run measures it: nothing here needs editing on the GPU machine. The batch is
chosen from XLA's memory analysis of the compiled step (batch 1 and 2 give the fixed and
the per-row bytes; the extrapolated largest batch is compiled and checked, and shrunk until
it fits 95% of the device's memory), so no step ever runs out of memory.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from crystal import attention, config, metrics, optim, train

FIT = 0.95   # share of the device's memory a compiled step may plan to use


def gpu_config(a):
    """The config's model at 7B width, `a.layers` scanned layers, bfloat16 compute."""
    seq = a.seq_len or 2048
    over = {"model.num_layers": a.layers, "model.d_model": a.width, "model.num_heads": a.heads,
            "model.ffn_dim": a.ffn, "model.max_seq_len": seq, "data.seq_len": seq,
            "model.compute_dtype": "bfloat16", "model.scan_layers": True,
            "train.global_batch_size": 1, "train.grad_accum": 1}
    if a.vocab:
        over["model.vocab_size"] = a.vocab
    return config.load(a.config, over)


def _batch(rows: int, seq: int, abstract: bool):
    shapes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32}
    if abstract:
        return {k: jax.ShapeDtypeStruct((rows, seq), d) for k, d in shapes.items()}
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 1000, (rows, seq + 1)).astype(np.int32)
    return jax.device_put(dict(inputs=toks[:, :-1], targets=toks[:, 1:],
                               loss_mask=np.ones((rows, seq), np.float32)))


def compile_step(cfg, rows: int):
    """(compiled donated train step at `rows` sequences, its planned peak bytes)."""
    opt = optim.make_optimizer(cfg, 1)
    step = jax.jit(train.make_train_step(cfg, opt), donate_argnums=0)
    compiled = step.lower(train.abstract_state(cfg, opt),
                          _batch(rows, cfg.data.seq_len, True)).compile()
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return compiled, int(peak)


def largest_batch(cfg, limit: int | None, max_batch: int):
    """(rows, compiled step, planned peak): the most rows whose step fits `limit` bytes."""
    if not limit:   # no allocator limit to fit (CPU): the largest batch asked for
        return (max_batch,) + compile_step(cfg, max_batch)
    _, p1 = compile_step(cfg, 1)
    _, p2 = compile_step(cfg, 2)
    per_row = max(p2 - p1, 1)
    rows = max(1, min(max_batch, int((FIT * limit - (p1 - per_row)) // per_row)))
    while True:
        compiled, peak = compile_step(cfg, rows)
        if peak <= FIT * limit or rows == 1:
            return rows, compiled, peak
        rows = max(1, int(rows * FIT * limit / peak))


def fused_attention(hlo: str) -> str:
    """The fused attention kernels the compiled step calls ('' if none)."""
    names = sorted({t for t in hlo.split('custom_call_target="')[1:]
                    for t in [t.split('"', 1)[0]] if "fmha" in t or "flash" in t})
    return ", ".join(names)


def main(a):
    cfg = gpu_config(a)
    dev = jax.devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit")
    impl = attention.resolve(cfg.model.attention, jnp.bfloat16, cfg.model.d_model //
                             cfg.model.num_heads)
    print(f"device: {dev.device_kind} ({jax.default_backend()}), memory limit "
          f"{limit / 2**30:.1f} GiB" if limit else f"device: {dev.device_kind} "
          f"({jax.default_backend()}), no memory limit reported")
    t0 = time.time()
    rows, compiled, peak = largest_batch(cfg, limit, a.max_batch)
    print(f"model: {a.layers} layers x d_model {cfg.model.d_model}, {cfg.model.num_heads} heads, "
          f"ffn {cfg.model.ffn_dim}, vocab {cfg.model.vocab_size}, seq {cfg.data.seq_len}, "
          f"bfloat16 compute, remat={cfg.model.remat}, attention={impl}")
    print(f"batch: {rows} x {cfg.data.seq_len} (planned peak {peak / 2**30:.1f} GiB; "
          f"search + compile {time.time() - t0:.0f} s)")
    opt = optim.make_optimizer(cfg, 1)
    state = jax.jit(lambda k: train.init_state(cfg, k, opt))(jax.random.key(0))
    batch = _batch(rows, cfg.data.seq_len, False)
    times = []
    for i in range(a.steps + 2):   # two warm-up steps
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    tok_s = rows * cfg.data.seq_len / dt
    peak_flops = metrics.peak_flops_per_device(dev.device_kind)
    mfu = tok_s * metrics.flops_per_token(cfg) / peak_flops
    fused = fused_attention(compiled.as_text())
    print(f"step: {dt * 1e3:.1f} ms median of {len(times)}, {tok_s:,.0f} tokens/s, loss "
          f"{float(m['loss']):.3f}, peak FLOP/s {peak_flops:.3g}")
    print(f"attention fused: {'yes (' + fused + ')' if fused else 'no'}")
    print(f"gpu mfu={mfu:.3f} (goal >= 0.55 on an H200) fused={'yes' if fused else 'no'}")
    if jax.default_backend() == "gpu" and impl == "cudnn" and not fused:
        raise SystemExit("error: attention=cudnn but the compiled step calls no fused kernel")
    if not math.isfinite(float(m["loss"])):
        raise SystemExit("error: the loss is not finite")
