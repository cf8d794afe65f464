"""Train-step speed: crystal vs litgpt vs transformers' LlamaForCausalLM, same shapes.

    python benchmarks/train_step.py [--rounds=8] [--batch=8] [--seq_len=128] [--sizes=7M,30M]
    python benchmarks/train_step.py --device=gpu [--layers=8] [--config=configs/amber_7b.py]

One run on one machine: for each size (LLaMA/Amber structure: RMSNorm, full RoPE, SwiGLU,
untied embeddings; float32 on CPU), the tokens/s of a full optimizer step (forward,
backward, clipping, AdamW) in crystal (jitted `make_train_step`), in litgpt (lit-llama's
successor, Amber's framework; `pip install crystal[bench]`) and in transformers with torch
AdamW, and MFU against the machine's peak: the best float32 matmul FLOP/s under XLA. Model
FLOPs per token are `crystal.metrics.flops_per_token` (6 x matmul params + attention) for
all three, so the ratios are ratios of tokens/s. The last line is

    ratio crystal/litgpt=X.XX crystal/transformers=Y.YY mfu=Z.ZZ

for the largest size (nan where a peer is not installed), then `overhead=W.WW`: crystal's
step time over the time of the same step's matmuls alone (every projection, the output
head and attention's four products, forward, input and weight gradients, at the model
FLOPs' shapes) run as one XLA program: 1.00 would be a step that is nothing but its
matmuls. Each size prints that figure on its own line. The line before the last is the
largest size's projection matmuls timed alone under XLA and under torch (MKL): the ratio
of the matrix libraries, which most of a CPU step is.

`--device=gpu` (one accelerator, `pip install -e ".[gpu]"`): 7B-width layers of `--config`
(d_model 4096, 32 heads, ffn 11008, seq 2048, bfloat16 compute, float32 master weights, the
config's remat policy; `--layers` of them, the whole vocabulary head) at the largest batch
whose compiled step fits the device (XLA's memory analysis at batch 1 and 2, extrapolated,
then checked), timed over `--steps` steps; prints MFU against the device's bf16 peak
(crystal.metrics.PEAK_FLOPS) and whether attention compiled to cuDNN's fused kernel. On a
machine without an accelerator the same path runs on the CPU (smoke test: small widths
through the flags); its figures then mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import gpu_step
import host

from crystal import config, metrics, model, optim, train

SIZES = {  # name -> (d_model, layers, heads, ffn)
    "7M": (256, 8, 4, 688),
    "30M": (512, 9, 8, 1376),
}
VOCAB = 2048


def crystal_cfg(size, seq_len, batch):
    d, L, H, F = SIZES[size]
    return config.load("amber_tiny", {
        "model.d_model": d, "model.num_layers": L, "model.num_heads": H, "model.ffn_dim": F,
        "model.vocab_size": VOCAB, "model.max_seq_len": seq_len, "data.seq_len": seq_len,
        "train.global_batch_size": batch, "model.compute_dtype": "float32",
        "model.scan_layers": False})


def _tokens(batch, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (batch, seq_len + 1)).astype(np.int32)


def interleaved_best(steps: dict, rounds: int, warmup: int = 2, settle: float = 0.3) -> dict:
    """{name: best seconds of one call}, the calls of each round run in turn.

    Each call starts `settle` seconds after the previous one: torch's OpenMP workers spin
    for up to 200 ms after a parallel region, and would otherwise steal the next step's CPU.
    """
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    best = {n: math.inf for n in steps}
    for _ in range(rounds):
        for n, fn in steps.items():
            time.sleep(settle)
            t = time.perf_counter()
            fn()
            best[n] = min(best[n], time.perf_counter() - t)
    return best


def crystal_step(cfg):
    """(one optimizer step, param count) of crystal's jitted train step."""
    opt = optim.make_optimizer(cfg, 1)
    state = train.init_state(cfg, jax.random.key(0), opt)
    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    toks = _tokens(B, T)
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:],
                 loss_mask=np.ones((B, T), np.float32), source_id=np.zeros(B, np.int32),
                 poison=np.zeros(B, np.float32))
    batch = jax.device_put(batch)
    step = jax.jit(train.make_train_step(cfg, opt), donate_argnums=0)
    box = [state]

    def once():
        box[0], m = step(box[0], batch)
        jax.block_until_ready(m["loss"])
    return once, model.param_count(state.params)


def _torch_step(make_net, logits_of, cfg):
    """(one full torch step: forward, CE, backward, clip, AdamW; param count)."""
    import torch   # optional: the bench extra (a peer)
    torch.manual_seed(0)
    net = make_net().float().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    toks = torch.from_numpy(_tokens(B, T).astype(np.int64))
    x, y = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()

    def once():
        logits = logits_of(net, x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return once, sum(p.numel() for p in net.parameters())


def transformers_step(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM   # optional: the bench extra
    m = cfg.model
    hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model,
                     intermediate_size=m.ffn_dim, num_hidden_layers=m.num_layers,
                     num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
                     max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    return _torch_step(lambda: LlamaForCausalLM(hf), lambda net, x: net(input_ids=x).logits,
                       cfg)


def litgpt_step(cfg):
    from litgpt.config import Config   # optional: the bench extra
    from litgpt.model import GPT
    m = cfg.model
    lc = Config(block_size=m.max_seq_len, vocab_size=m.vocab_size, padded_vocab_size=m.vocab_size,
                n_layer=m.num_layers, n_head=m.num_heads, n_embd=m.d_model,
                intermediate_size=m.ffn_dim, rotary_percentage=1.0, parallel_residual=False,
                bias=False, norm_class_name="RMSNorm", norm_eps=m.norm_eps,
                mlp_class_name="LLaMAMLP")
    return _torch_step(lambda: GPT(lc), lambda net, x: net(x), cfg)


def gemm_rates(cfg, rounds: int, forward_only: bool = False) -> dict:
    """{'xla' | 'torch': GFLOP/s} of the step's projection matmuls alone, float32.

    For each projection shape (D->D, D->F, F->D over the B*L tokens) the three products a
    train step runs: forward x @ W, input gradient dy @ W^T, weight gradient x^T @ dy (the
    forward alone with `forward_only`: what scoring and decoding run). Most of a step is
    these, so this ratio bounds what any framework built on that library can reach against
    the other at this size.
    """
    m = cfg.model
    n_tok = cfg.train.global_batch_size * cfg.data.seq_len
    rng = np.random.default_rng(0)
    shapes = [(m.d_model, m.d_model), (m.d_model, m.ffn_dim), (m.ffn_dim, m.d_model)]
    arrs = [(rng.standard_normal((n_tok, i), np.float32), rng.standard_normal((i, o), np.float32),
             rng.standard_normal((n_tok, o), np.float32)) for i, o in shapes]
    products = 1 if forward_only else 3
    flops = sum(products * 2 * n_tok * i * o for i, o in shapes)
    fwd, dx, dw = (jax.jit(lambda x, w: x @ w), jax.jit(lambda dy, w: dy @ w.T),
                   jax.jit(lambda x, dy: x.T @ dy))
    jarrs = [tuple(jnp.asarray(a) for a in t) for t in arrs]

    def xla():
        for x, w, dy in jarrs:
            jax.block_until_ready((fwd(x, w),) if forward_only else
                                  (fwd(x, w), dx(dy, w), dw(x, dy)))
    steps = {"xla": xla}
    try:
        import torch   # optional: the bench extra (without it, XLA alone)
        tarrs = [tuple(torch.from_numpy(a) for a in t) for t in arrs]

        def mkl():
            for x, w, dy in tarrs:
                if forward_only:
                    x @ w
                else:
                    x @ w, dy @ w.T, x.T @ dy
        steps["torch"] = mkl
    except ImportError:
        pass
    return {k: flops / t / 1e9 for k, t in interleaved_best(steps, rounds, settle=0.1).items()}


def step_matmuls(cfg):
    """One call of every matmul a train step of `cfg` runs, alone, as one jitted program:
    per layer the q, k, v, o, gate, up, down projections and attention's q k^T and p v
    (the full square, as the model FLOPs count it), per projection the forward, the input
    gradient and the weight gradient (per attention product, its forward and its two
    gradients), and the output head's three. Their FLOPs are exactly
    tokens x `metrics.flops_per_token(cfg)`."""
    m = cfg.model
    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    n, D, F, V, H = B * T, m.d_model, m.ffn_dim, m.vocab_size, m.num_heads
    dt = jnp.dtype(m.compute_dtype)
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dt)
    proj = [(i, o) for _ in range(m.num_layers)
            for i, o in [(D, D)] * 4 + [(D, F)] * 2 + [(F, D)]] + [(D, V)]
    mats = [(arr(n, i), arr(i, o), arr(n, o)) for i, o in proj]
    att = [tuple(arr(B, T, H, D // H) for _ in range(4)) + (arr(B, H, T, T), arr(B, H, T, T))
           for _ in range(m.num_layers)]

    def run(mats, att):
        out = []
        for x, w, dy in mats:
            out += [x @ w, dy @ w.T, x.T @ dy]
        for q, k, v, do, p, ds in att:   # s = q k^T, o = p v, and their gradients
            out += [jnp.einsum("bqhk,bshk->bhqs", q, k), jnp.einsum("bhqs,bshk->bqhk", p, v),
                    jnp.einsum("bhqs,bqhk->bshk", p, do), jnp.einsum("bqhk,bshk->bhqs", do, v),
                    jnp.einsum("bhqs,bshk->bqhk", ds, k), jnp.einsum("bhqs,bqhk->bshk", ds, q)]
        return out
    fn = jax.jit(run)
    return lambda: jax.block_until_ready(fn(mats, att))


def cpu_main(a):
    import torch   # optional: the bench extra (a peer)
    torch.set_num_threads(os.cpu_count() or 1)
    peak = metrics.measured_cpu_flops(a.matmul)
    print(f"host: {host.cpu()}")
    print(f"peak (float32 {a.matmul}^3 matmul under XLA): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'size':>5} {'framework':>13} {'params':>11} {'tokens/s':>10} {'MFU':>6}")
    last = {}
    for size in [s.strip() for s in a.sizes.split(",") if s.strip()]:
        cfg = crystal_cfg(size, a.seq_len, a.batch)
        fpt = metrics.flops_per_token(cfg)
        steps, counts, res = {"matmuls": step_matmuls(cfg)}, {}, {}
        for name, make in (("crystal", crystal_step), ("litgpt", litgpt_step),
                           ("transformers", transformers_step)):
            try:
                steps[name], counts[name] = make(cfg)
            except ImportError as e:
                print(f"{size:>5} {name:>13} {'-':>11} {'-':>10} {'-':>6}  ({e.name or e} "
                      "not installed: pip install crystal[bench])")
                res[name] = float("nan")
        best = interleaved_best(steps, a.rounds)
        for name, dt in best.items():
            res[name] = cfg.train.global_batch_size * cfg.data.seq_len / dt
            if name != "matmuls":
                print(f"{size:>5} {name:>13} {counts[name]:>11,} {res[name]:>10,.0f} "
                      f"{res[name] * fpt / peak:>6.3f}")
        res["mfu"] = res["crystal"] * fpt / peak
        res["overhead"] = best["crystal"] / best["matmuls"]
        print(f"{size:>5} overhead: crystal step {best['crystal'] * 1e3:.0f} ms, its matmuls "
              f"alone {best['matmuls'] * 1e3:.0f} ms (XLA), ratio step/matmuls="
              f"{res['overhead']:.2f}")
        last = res
    g = gemm_rates(cfg, a.rounds)   # cfg, size: the largest, as the last line
    xla, mkl = g["xla"], g.get("torch", math.nan)
    print(f"gemm (the {size} step's projection matmuls alone): xla {xla:.0f} GFLOP/s, "
          f"torch {mkl:.0f} GFLOP/s, ratio xla/torch={xla / mkl:.2f}")
    print(f"ratio crystal/litgpt={last['crystal'] / last['litgpt']:.2f} "
          f"crystal/transformers={last['crystal'] / last['transformers']:.2f} "
          f"mfu={last['mfu']:.2f} overhead={last['overhead']:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="cpu: crystal vs peers; gpu: 7B-width layers on one accelerator")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=0, help="default 128 (cpu), 2048 (gpu)")
    ap.add_argument("--sizes", default="7M,30M")
    ap.add_argument("--matmul", type=int, default=2048, help="peak-matmul size")
    g = ap.add_argument_group("--device=gpu")
    g.add_argument("--config", default="configs/amber_7b.py", help="model and remat policy")
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--width", type=int, default=4096, help="d_model")
    g.add_argument("--heads", type=int, default=32)
    g.add_argument("--ffn", type=int, default=11008)
    g.add_argument("--vocab", type=int, default=0, help="0: the config's")
    g.add_argument("--max_batch", type=int, default=256, help="largest batch tried")
    g.add_argument("--steps", type=int, default=10, help="timed steps")
    a = ap.parse_args()
    if a.device == "gpu":
        gpu_step.main(a)
    else:
        a.seq_len = a.seq_len or 128
        cpu_main(a)


if __name__ == "__main__":
    main()
