"""The attention core: softmax(q k^T x scale, masked) v, one function for every caller.

Training, prefill and cached decoding all call `attend`. What a query may see is stated by
explicit slot indices, never by shapes: key slot s is visible to query slot t when
`k_index[s] <= q_index[t]` (causal), both lie in the same packed document
(`q_segment == k_segment`, when segments are given) and the key holds data (`k_valid`, a
KV cache's filled slots). Slots are places in the row, not RoPE positions (those restart at
every packed document).

Without indices the queries and keys are the same slots 0..T-1 (training, prefill); that
case has fused implementations:

- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused flash
  attention (GPU, bfloat16/float16): the causal mask is the kernel's own, so it never
  computes the upper triangle; packed segments go in as a mask.
- 'blocked': query blocks that never compute the keys after them (CPU): query block i
  multiplies only key blocks 0..i, so causal attention costs (n + 1) / 2n of the square
  (n blocks, at most 8), in matmuls, softmax and their backward; flash-attention style, the
  backward recomputes each block's probabilities from the saved log-partitions, so memory
  is one block's, not the square's.
- 'xla': `jax.nn.dot_product_attention(implementation='xla')`, the full square with the
  mask applied (any backend; also every call with explicit indices).

'auto' picks cudnn on an NVIDIA GPU with a 16-bit compute dtype, blocked on CPU, else xla.
Every implementation computes the logits in float32 and the softmax in float32, scales by
`scale` exactly (muP's 1/head_dim), and returns the compute dtype.

Shape suffixes: B batch, T query slots, S key slots, H heads, K head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Fewest query rows per block of the 'blocked' kernel: 64 at T=128 runs 3/4 of the square
# in two blocks; smaller blocks skip more of it but multiply smaller, slower matrices.
BLOCK = 64


def _is_cuda() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and "cuda" in str(
        getattr(dev.client, "platform_version", "")).lower()


def resolve(impl: str, dtype, head_dim: int) -> str:
    """The implementation 'auto' means here (the backend JAX runs on), else `impl`."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128 and _is_cuda()):
        return "cudnn"
    return "blocked" if backend == "cpu" else "xla"


def visible(q_index_BxT, k_index_BxS, q_segment_BxT=None, k_segment_BxS=None,
            k_valid_BxS=None):
    """B x 1 x T x S bool: which keys each query may attend to (causal by slot index, the
    same packed document, filled cache slots)."""
    m_BxTxS = k_index_BxS[:, None, :] <= q_index_BxT[:, :, None]
    if q_segment_BxT is not None:
        m_BxTxS &= q_segment_BxT[:, :, None] == k_segment_BxS[:, None, :]
    if k_valid_BxS is not None:
        m_BxTxS &= k_valid_BxS[:, None, :]
    return m_BxTxS[:, None]


def logits(q_BxTxHxK, k_BxSxHxK, scale: float):
    """B x H x T x S float32 scores q k^T x scale (accumulated in float32)."""
    return jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxSxHxK,
                      preferred_element_type=jnp.float32) * scale


def _slots(x_BxT):
    B, T = x_BxT.shape[:2]
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, *, scale: float, impl: str = "auto",
           q_index_BxT=None, k_index_BxS=None, q_segment_BxT=None, k_segment_BxS=None,
           k_valid_BxS=None):
    """Attention output B x T x H x K in q's dtype.

    `q_index`/`k_index` None: queries and keys are the same slots 0..T-1 (then the fused
    implementations apply). Segments (both or neither) mask across packed documents;
    `k_valid` masks unfilled keys."""
    impl = resolve(impl, q_BxTxHxK.dtype, q_BxTxHxK.shape[-1])
    same_slots = q_index_BxT is None and k_index_BxS is None and k_valid_BxS is None
    T = q_BxTxHxK.shape[1]
    if same_slots and impl == "cudnn":
        seg = None
        if q_segment_BxT is not None:
            seg = (q_segment_BxT[:, :, None] == k_segment_BxS[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=seg,
                                            scale=scale, is_causal=True,
                                            implementation="cudnn")
    if same_slots and impl == "blocked" and _block_len(T):
        return _blocked_causal(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_BxT, k_segment_BxS,
                               float(scale))
    if q_index_BxT is None:
        q_index_BxT = _slots(q_BxTxHxK)
    if k_index_BxS is None:
        k_index_BxS = _slots(k_BxSxHxK)
    mask = visible(q_index_BxT, k_index_BxS, q_segment_BxT, k_segment_BxS, k_valid_BxS)
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask,
                                        scale=scale, implementation="xla")


def _block_len(T: int) -> int:
    """Query rows per block: at least BLOCK, at most 8 blocks (each block's matmuls stay
    large enough for the CPU's matrix library), dividing T; 0 if T has no such split."""
    blk = max(BLOCK, T // 8)
    while blk < T and T % blk:
        blk += 1
    return blk if blk < T else 0


def _block_mask(lo: int, hi: int, q_seg_BxT, k_seg_BxT):
    """(B|1) x 1 x (hi - lo) x hi: keys before the block all visible, the diagonal block
    lower-triangular, and the same packed document when segments are given."""
    n = hi - lo
    causal_QxS = jnp.concatenate([jnp.ones((n, lo), bool), jnp.tril(jnp.ones((n, n), bool))],
                                 axis=1)[None, None]
    if q_seg_BxT is None:
        return causal_QxS
    return causal_QxS & (q_seg_BxT[:, lo:hi, None] == k_seg_BxT[:, None, :hi])[:, None]


def _block_logits(q_BxTxHxK, k_BxTxHxK, scale, q_seg, k_seg, lo, hi):
    s_BxHxQxS = logits(q_BxTxHxK[:, lo:hi], k_BxTxHxK[:, :hi], scale)
    return jnp.where(_block_mask(lo, hi, q_seg, k_seg), s_BxHxQxS, jnp.finfo(jnp.float32).min)


def _blocks(T: int):
    blk = _block_len(T)
    return [(lo, lo + blk) for lo in range(0, T, blk)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked_causal(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, q_seg_BxT, k_seg_BxT, scale):
    """Causal self-attention by query blocks: block i sees key blocks 0..i only, so the
    upper triangle past the diagonal blocks is never computed, forward or backward. Like
    flash attention, the forward keeps only the output and each row's log-partition; the
    backward recomputes one block's probabilities at a time, so no T x T array (nor the
    blocks' sum of them) is ever alive at once."""
    return _blocked_fwd(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, q_seg_BxT, k_seg_BxT, scale)[0]


def _blocked_fwd(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, q_seg_BxT, k_seg_BxT, scale):
    outs, lses = [], []
    for lo, hi in _blocks(q_BxTxHxK.shape[1]):
        s_BxHxQxS = _block_logits(q_BxTxHxK, k_BxTxHxK, scale, q_seg_BxT, k_seg_BxT, lo, hi)
        lse_BxHxQ = jax.nn.logsumexp(s_BxHxQxS, axis=-1)
        p_BxHxQxS = jnp.exp(s_BxHxQxS - lse_BxHxQ[..., None]).astype(v_BxTxHxK.dtype)
        outs.append(jnp.einsum("bhqs,bshk->bqhk", p_BxHxQxS, v_BxTxHxK[:, :hi]))
        lses.append(lse_BxHxQ)
    o_BxTxHxK = jnp.concatenate(outs, axis=1)
    res = (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, q_seg_BxT, k_seg_BxT, o_BxTxHxK,
           jnp.concatenate(lses, axis=-1))
    return o_BxTxHxK, res


def _blocked_bwd(scale, res, do_BxTxHxK):
    """Per block: p = exp(s - lse); dv += p^T do; ds = p (do v^T - rowsum(do o)) x scale;
    dq = ds k; dk += ds^T q. Matmuls in the compute dtype, accumulated in float32."""
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, q_seg, k_seg, o_BxTxHxK, lse_BxHxT = res
    dt, f32 = q_BxTxHxK.dtype, jnp.float32
    delta_BxHxT = jnp.einsum("bqhk,bqhk->bhq", do_BxTxHxK.astype(f32), o_BxTxHxK.astype(f32))
    dk_BxTxHxK = jnp.zeros(k_BxTxHxK.shape, f32)
    dv_BxTxHxK = jnp.zeros(v_BxTxHxK.shape, f32)
    dqs = []
    for lo, hi in _blocks(q_BxTxHxK.shape[1]):
        s_BxHxQxS = _block_logits(q_BxTxHxK, k_BxTxHxK, scale, q_seg, k_seg, lo, hi)
        p_BxHxQxS = jnp.exp(s_BxHxQxS - lse_BxHxT[..., lo:hi, None])
        do_BxQxHxK = do_BxTxHxK[:, lo:hi]
        dv_BxTxHxK = dv_BxTxHxK.at[:, :hi].add(jnp.einsum(
            "bhqs,bqhk->bshk", p_BxHxQxS.astype(dt), do_BxQxHxK, preferred_element_type=f32))
        dp_BxHxQxS = jnp.einsum("bqhk,bshk->bhqs", do_BxQxHxK, v_BxTxHxK[:, :hi],
                                preferred_element_type=f32)
        ds_BxHxQxS = (p_BxHxQxS * (dp_BxHxQxS - delta_BxHxT[..., lo:hi, None]) * scale
                      ).astype(dt)
        dqs.append(jnp.einsum("bhqs,bshk->bqhk", ds_BxHxQxS, k_BxTxHxK[:, :hi],
                              preferred_element_type=f32))
        dk_BxTxHxK = dk_BxTxHxK.at[:, :hi].add(jnp.einsum(
            "bhqs,bqhk->bshk", ds_BxHxQxS, q_BxTxHxK[:, lo:hi], preferred_element_type=f32))
    dq_BxTxHxK = jnp.concatenate(dqs, axis=1)
    return (dq_BxTxHxK.astype(dt), dk_BxTxHxK.astype(k_BxTxHxK.dtype),
            dv_BxTxHxK.astype(v_BxTxHxK.dtype), None, None)


_blocked_causal.defvjp(_blocked_fwd, _blocked_bwd)
