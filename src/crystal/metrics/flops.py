"""FLOPs, parameter counts, MFU: the one formula crystal uses everywhere (info, the loop's
MFU, plan's analytic line, benchmarks), and the peak FLOP/s it divides by."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp

from crystal.errors import MetricsError


def param_breakdown(cfg) -> dict[str, int]:
    """Exact parameter counts from the config's shapes (crystal/model.py's layout).

    Per layer: q, k, v, o (d x d each; + d each with qkv_bias / out_bias), a SwiGLU FFN
    (gate, up: d x f; down: f x d; + f, f, d with ffn_bias), two norms (d scale, + d bias
    with norm_bias); then a final norm, the input embedding (V x d) and an output head
    (V x d, no bias) unless tie_embeddings.
    """
    m = cfg.model
    d, f, V, L = m.d_model, m.ffn_dim, m.vocab_size, m.num_layers
    norm = d * (2 if m.norm_bias else 1)
    attn = 4 * d * d + (3 * d if m.qkv_bias else 0) + (d if m.out_bias else 0)
    ffn = 3 * d * f + ((2 * f + d) if m.ffn_bias else 0)
    embed = V * d
    head = 0 if m.tie_embeddings else V * d
    layers = L * (attn + ffn + 2 * norm)
    total = embed + head + layers + norm
    return dict(
        total=total,
        embedding=embed,
        output_head=head,
        layers=layers,
        non_embedding=total - embed,
        # weights used in matmuls: the projections and the logit matmul (the tied embedding
        # is one), not the embedding lookup, norms or biases
        matmul=L * (4 * d * d + 3 * d * f) + V * d,
    )


def param_count(cfg) -> int:
    """Total parameters (Amber 7B: 6,738,415,616; CrystalCoder 7B: 6,575,278,720)."""
    return param_breakdown(cfg)["total"]


def flops_per_token(cfg) -> float:
    """Training FLOPs per token, the one definition crystal uses (info, MFU).

        flops_per_token = 6 * N_matmul + 12 * num_layers * d_model * seq_len

    N_matmul counts every weight used in a matrix multiply: the attention and FFN
    projections and the output/logit matmul (V x d; the tied embedding counts once, as the
    logit matmul), not the embedding lookup, norms or biases. 6 = 2 FLOPs per multiply-add
    x (forward + 2x backward). The second term is attention's QK^T and AV matmuls at
    sequence length T = data.seq_len, counted without the causal half (the PaLM appendix B
    / Chinchilla convention). Activation recomputation (remat) is not counted: this is
    model FLOPs, so MFU stays comparable across remat policies.
    """
    m = cfg.model
    return 6.0 * param_breakdown(cfg)["matmul"] + 12.0 * m.num_layers * m.d_model * cfg.data.seq_len


# Dense bf16 peak FLOP/s per device (no 2:4 sparsity), from vendor data sheets:
# NVIDIA A100 data sheet (312 TFLOPS BF16 Tensor Core), H100 SXM data sheet (989 TFLOPS
# dense BF16; 1979 with sparsity; PCIe card 756), H200 SXM (same compute as H100: 989); Google
# Cloud TPU system-architecture pages: v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOPS bf16.
# Keys are matched as lower-case substrings of jax's device_kind, most specific first.
PEAK_FLOPS = (
    ("a100", 312e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),       # jax names v5p "TPU v5"
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
)


@functools.cache
def measured_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one float32 n x n matmul under XLA on the first CPU device, best of
    `repeats` (cached per process). CPUs have no data-sheet number that fits XLA's code."""
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
    """Peak FLOP/s of one device: `override` (metrics.peak_flops_per_device) if > 0, the
    PEAK_FLOPS table for GPUs/TPUs, a runtime measurement for CPUs."""
    if override and override > 0:
        return float(override)
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    if kind == "cpu" or "cpu" in kind:
        return measured_cpu_flops()
    raise MetricsError(f"device kind {device_kind!r}: no peak FLOP/s known; set "
                       "metrics.peak_flops_per_device")


def mfu(tokens_per_s: float, cfg, num_devices: int, device_kind: str) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    override = cfg.metrics.get("peak_flops_per_device", 0.0)
    peak = peak_flops_per_device(device_kind, override)
    return tokens_per_s * flops_per_token(cfg) / (num_devices * peak)
