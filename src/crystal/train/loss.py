"""The output projection and the cross-entropy, in sequence chunks, forward and backward.

Materialising float32 logits for a whole batch costs B x L x V x 4 bytes (262 MB per
2048-token row at CrystalCoder's 32,032 rows), and autodiff keeps them, their softmax and
their gradient alive at once. Here the logits of one chunk of `chunk` sequence positions
(all rows) exist at a time: the forward keeps only each token's log-partition (B x L
float32); the backward recomputes a chunk's logits from the saved hidden states, turns
them into the softmax gradient in the same pass, and accumulates the head's gradient in
float32. Chunks run along the sequence, so rows keep their batch sharding.

Numerics: logits = (hidden @ head in the compute dtype, float32 accumulation) x muP's
logit multiplier, as `model.logits`; logsumexp and the loss are float32; the gradient
matmuls take the softmax gradient in the compute dtype with float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def chunk_len(length: int, chunk: int) -> int:
    """Positions per chunk: `chunk`, or the largest divisor of `length` below it (0 or a
    chunk at least `length` long: one chunk)."""
    if chunk <= 0 or chunk >= length:
        return length
    while length % chunk:
        chunk -= 1
    return chunk


def _chunks(x_BxL, c: int):
    """B x L x ... -> n x B x c x ... (the scan axis first)."""
    B, L = x_BxL.shape[:2]
    return jnp.swapaxes(x_BxL.reshape(B, L // c, c, *x_BxL.shape[2:]), 0, 1)


def _unchunk(x_nxBxc):
    n, B, c = x_nxBxc.shape[:3]
    return jnp.swapaxes(x_nxBxc, 0, 1).reshape(B, n * c, *x_nxBxc.shape[3:])


def _logits(h_BxCxD, w_DxV, mult: float, dtype):
    B, C, D = h_BxCxD.shape
    out = jnp.dot(h_BxCxD.reshape(B * C, D).astype(dtype), w_DxV,
                  preferred_element_type=jnp.float32)
    return out.reshape(B, C, -1) * mult


def _forward(h_BxLxD, w_DxV, targets_BxL, mult, dtype, chunk, with_abs, with_hits=False):
    c = chunk_len(h_BxLxD.shape[1], chunk)
    w_dt = w_DxV.astype(dtype)

    def body(_, xs):
        h_BxCxD, t_BxC = xs
        z_BxCxV = _logits(h_BxCxD, w_dt, mult, dtype)
        lse_BxC = jax.nn.logsumexp(z_BxCxV, axis=-1)
        tgt_BxC = jnp.take_along_axis(z_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
        abs_sum = jnp.sum(jnp.abs(z_BxCxV)) if with_abs else jnp.zeros([], jnp.float32)
        hit_BxC = jnp.argmax(z_BxCxV, axis=-1) == t_BxC if with_hits else \
            jnp.zeros([], bool)
        return None, (lse_BxC - tgt_BxC, lse_BxC, abs_sum, hit_BxC)

    _, (loss_nxBxC, lse_nxBxC, abs_n, hit_nxBxC) = jax.lax.scan(
        body, None, (_chunks(h_BxLxD, c), _chunks(targets_BxL, c)))
    hits = _unchunk(hit_nxBxC) if with_hits else None
    return _unchunk(loss_nxBxC), _unchunk(lse_nxBxC), jnp.sum(abs_n), hits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _cross_entropy(h_BxLxD, w_DxV, targets_BxL, mult, dtype, chunk, with_abs):
    loss_BxL, _, abs_sum, _ = _forward(h_BxLxD, w_DxV, targets_BxL, mult, dtype, chunk,
                                       with_abs)
    return loss_BxL, abs_sum


def _cross_entropy_fwd(h_BxLxD, w_DxV, targets_BxL, mult, dtype, chunk, with_abs):
    loss_BxL, lse_BxL, abs_sum, _ = _forward(h_BxLxD, w_DxV, targets_BxL, mult, dtype, chunk,
                                             with_abs)
    return (loss_BxL, abs_sum), (h_BxLxD, w_DxV, targets_BxL, lse_BxL)


def _cross_entropy_bwd(mult, dtype, chunk, with_abs, res, cts):
    """d loss / d logits = g x (softmax - onehot(target)), plus g_abs x sign(logits) for
    the captured mean |logit|; then x mult into both matmuls."""
    h_BxLxD, w_DxV, targets_BxL, lse_BxL = res
    g_BxL, g_abs = cts
    c = chunk_len(h_BxLxD.shape[1], chunk)
    w_dt = w_DxV.astype(dtype)

    def body(dw_DxV, xs):
        h_BxCxD, t_BxC, lse_BxC, g_BxC = xs
        z_BxCxV = _logits(h_BxCxD, w_dt, mult, dtype)
        hit_BxCxV = jnp.arange(z_BxCxV.shape[-1], dtype=t_BxC.dtype) == t_BxC[..., None]
        dz_BxCxV = g_BxC[..., None] * (jnp.exp(z_BxCxV - lse_BxC[..., None]) - hit_BxCxV)
        if with_abs:
            dz_BxCxV = dz_BxCxV + g_abs * jnp.sign(z_BxCxV)
        B, C, V = dz_BxCxV.shape
        dz_NxV = (dz_BxCxV * mult).reshape(B * C, V).astype(dtype)
        dh_BxCxD = jnp.dot(dz_NxV, w_dt.T, preferred_element_type=jnp.float32)
        dw_DxV = dw_DxV + jnp.dot(h_BxCxD.reshape(B * C, -1).astype(dtype).T, dz_NxV,
                                  preferred_element_type=jnp.float32)
        return dw_DxV, dh_BxCxD.reshape(B, C, -1).astype(h_BxLxD.dtype)

    dw_DxV, dh_nxBxCxD = jax.lax.scan(
        body, jnp.zeros(w_DxV.shape, jnp.float32),
        tuple(_chunks(x, c) for x in (h_BxLxD, targets_BxL, lse_BxL, g_BxL)))
    return _unchunk(dh_nxBxCxD), dw_DxV.astype(w_DxV.dtype), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def cross_entropy(hidden_BxLxD, head_DxV, targets_BxL, *, multiplier: float, dtype,
                  chunk: int, with_abs: bool = False):
    """(per-token float32 cross-entropy B x L, float32 sum of |logits| (0 unless
    `with_abs`)) of logits = hidden @ head x multiplier, `chunk` positions at a time."""
    return _cross_entropy(hidden_BxLxD, head_DxV, jnp.asarray(targets_BxL, jnp.int32),
                          float(multiplier), jnp.dtype(dtype), int(chunk), bool(with_abs))


def scores(hidden_BxLxD, head_DxV, targets_BxL, *, multiplier: float, dtype, chunk: int):
    """(per-token float32 cross-entropy B x L, bool B x L: the target is the argmax) for
    scoring, forward only: the same chunks and numerics as `cross_entropy`, so a scored
    text's losses are the training loss's; the argmax comes from the same logits (ties go
    to the lowest id, as jnp.argmax and torch.argmax)."""
    loss_BxL, _, _, hit_BxL = _forward(hidden_BxLxD, head_DxV, jnp.asarray(targets_BxL,
                                                                            jnp.int32),
                                       float(multiplier), jnp.dtype(dtype), int(chunk),
                                       False, True)
    return loss_BxL, hit_BxL
