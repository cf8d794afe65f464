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
  (n blocks), in matmuls, softmax and their backward.
- 'xla': `jax.nn.dot_product_attention(implementation='xla')`, the full square with the
  mask applied (any backend; also every call with explicit indices).

'auto' picks cudnn on an NVIDIA GPU with a 16-bit compute dtype, blocked on CPU, else xla.
Every implementation computes the logits in float32 and the softmax in float32, scales by
`scale` exactly (muP's 1/head_dim), and returns the compute dtype.

Shape suffixes: B batch, T query slots, S key slots, H heads, K head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Query rows per block of the 'blocked' kernel. 64 at T=128 runs 3/4 of the square in two
# blocks; smaller blocks skip more of it but multiply smaller, slower matrices on CPU.
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
           k_valid_BxS=None, block: int = BLOCK):
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
    if same_slots and impl == "blocked" and T > block and T % block == 0:
        return _blocked_causal(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, scale, q_segment_BxT,
                               k_segment_BxS, block)
    if q_index_BxT is None:
        q_index_BxT = _slots(q_BxTxHxK)
    if k_index_BxS is None:
        k_index_BxS = _slots(k_BxSxHxK)
    mask = visible(q_index_BxT, k_index_BxS, q_segment_BxT, k_segment_BxS, k_valid_BxS)
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask,
                                        scale=scale, implementation="xla")


def _softmax_attend(q, k, v, scale, mask):
    """One query block against its keys: the same float32 logits and softmax as 'xla'."""
    s_BxHxQxS = logits(q, k, scale)
    if mask is not None:
        s_BxHxQxS = jnp.where(mask, s_BxHxQxS, jnp.finfo(jnp.float32).min)
    p_BxHxQxS = jax.nn.softmax(s_BxHxQxS, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", p_BxHxQxS, v)


def _blocked_causal(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, scale, q_seg_BxT, k_seg_BxT, block):
    """Causal self-attention by query blocks: block i sees key blocks 0..i only, so the
    upper triangle past the diagonal blocks is never computed (nor differentiated)."""
    T = q_BxTxHxK.shape[1]
    tri_QxQ = jnp.tril(jnp.ones((block, block), bool))
    outs = []
    for i in range(T // block):
        lo, hi = i * block, (i + 1) * block
        # keys before the block are all visible; the diagonal block is lower-triangular
        causal_QxS = jnp.concatenate([jnp.ones((block, lo), bool), tri_QxQ], axis=1)
        mask = causal_QxS[None, None]
        if q_seg_BxT is not None:
            mask = mask & (q_seg_BxT[:, lo:hi, None] == k_seg_BxT[:, None, :hi])[:, None]
        outs.append(_softmax_attend(q_BxTxHxK[:, lo:hi], k_BxTxHxK[:, :hi],
                                    v_BxTxHxK[:, :hi], scale, mask))
    return jnp.concatenate(outs, axis=1)
