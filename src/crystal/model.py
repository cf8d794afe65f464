"""One decoder-only transformer for Amber (LLaMA) and CrystalCoder, chosen by config.

Params are a plain pytree and `apply` is a pure function. Every parameter carries logical
axis names (vocab, embed, heads, head_dim, mlp, layers, norm) that crystal.sharding maps to
mesh axes. Layers are stacked with `nn.scan` (one compiled block, params with a leading
`layers` axis), optionally rematerialised. Params are float32; matmuls run in the compute
dtype; norms, RoPE frequencies, softmax and logits are float32 whatever the compute dtype.

Shape suffixes: B batch, L length, D d_model, H heads, K head_dim, F ffn, V vocab.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from crystal import attention as attention_lib
from crystal import config as config_lib
from crystal import mup as mup_lib


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The hashable, fully derived model description (config + muP rules)."""
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    norm: str
    norm_eps: float
    norm_bias: bool
    qkv_bias: bool
    out_bias: bool
    ffn_bias: bool
    rotary_dims: int
    rotary_base: float
    rotary_pairing: str
    tie_embeddings: bool
    compute_dtype: str
    remat: str
    scan_layers: bool
    segment_mask: bool
    attention: str
    loss_chunk: int
    embedding_multiplier: float
    logit_multiplier: float
    attn_scale: float
    std_embedding: float
    std_hidden: float
    std_residual_out: float
    std_output: float

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        if isinstance(cfg, ModelSpec):
            return cfg
        m = cfg.model
        r = mup_lib.rules(cfg)
        hd = config_lib.head_dim(cfg)
        return cls(
            vocab_size=m.vocab_size, d_model=m.d_model, num_layers=m.num_layers,
            num_heads=m.num_heads, head_dim=hd, ffn_dim=m.ffn_dim, norm=m.norm,
            norm_eps=float(m.norm_eps), norm_bias=bool(m.norm_bias), qkv_bias=bool(m.qkv_bias),
            out_bias=bool(m.out_bias), ffn_bias=bool(m.ffn_bias),
            rotary_dims=config_lib.rotary_dims(cfg), rotary_base=float(m.rotary_base),
            rotary_pairing=m.rotary_pairing, tie_embeddings=bool(m.tie_embeddings),
            compute_dtype=m.compute_dtype, remat=m.remat, scan_layers=bool(m.scan_layers),
            segment_mask=bool(m.segment_mask), attention=m.attention,
            loss_chunk=int(m.loss_chunk),
            embedding_multiplier=r.embedding_multiplier, logit_multiplier=r.logit_multiplier,
            attn_scale=r.attn_scale(hd), std_embedding=r.init_std["embedding"],
            std_hidden=r.init_std["hidden"], std_residual_out=r.init_std["residual_out"],
            std_output=r.init_std["output"])

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)


def trunc_normal(std: float):
    """Truncated normal cut at +-2 sigma (std of the untruncated normal), as Cerebras/muP."""
    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std
                ).astype(dtype)
    return init


def _param(mod: nn.Module, name: str, init, shape, axes):
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Norm(nn.Module):
    spec: ModelSpec

    @nn.compact
    def __call__(self, x_BxLxD):
        s = self.spec
        x = x_BxLxD.astype(jnp.float32)
        scale_D = _param(self, "scale", nn.initializers.ones, (s.d_model,), ("norm",))
        if s.norm == "rmsnorm":
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + s.norm_eps)
        else:
            mu = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
            y = (x - mu) * jax.lax.rsqrt(var + s.norm_eps)
        y = y * scale_D
        if s.norm_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (s.d_model,), ("norm",))
        return y.astype(s.dtype)


def rotary_table(positions_BxL, spec: ModelSpec):
    """(cos, sin), each B x L x 1 x R float32, laid out for `apply_rotary`'s pairing, sin
    signed. Computed once per forward and shared by every layer (XLA:CPU otherwise fuses
    sin/cos into each layer's forward and backward and recomputes them per element)."""
    r = spec.rotary_dims
    inv_freq = 1.0 / (spec.rotary_base ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))
    ang_BxLxR2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(ang_BxLxR2), jnp.sin(ang_BxLxR2)
    if spec.rotary_pairing == "half":   # [a, b] -> [a cos - b sin, b cos + a sin]
        cos, sin = jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)
    else:                               # the same on pairs (0,1), (2,3), ...
        cos = jnp.repeat(cos, 2, axis=-1)
        sin = jnp.stack([-sin, sin], axis=-1).reshape(cos.shape)
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rotary(x_BxLxHxK, table, spec: ModelSpec):
    """RoPE on the first `rotary_dims` of each head, in float32, rotate-half or GPT-J pairs.

    x * cos + swap(x) * sin, where swap exchanges the two halves (or the two members of each
    pair) by a reshape and flip: no slices or concatenations, whose backward is pads and
    adds."""
    r, K = spec.rotary_dims, x_BxLxHxK.shape[-1]
    cos, sin = table
    x = x_BxLxHxK.astype(jnp.float32)
    rot = x[..., :r] if r < K else x
    pairs = (2, r // 2) if spec.rotary_pairing == "half" else (r // 2, 2)
    axis = -2 if spec.rotary_pairing == "half" else -1
    swapped = jnp.flip(rot.reshape(*rot.shape[:-1], *pairs), axis=axis).reshape(rot.shape)
    rot = rot * cos + swapped * sin
    if r < K:
        rot = jnp.concatenate([rot, x[..., r:]], axis=-1)
    return rot.astype(x_BxLxHxK.dtype)


def rotary(x_BxLxHxK, positions_BxL, spec: ModelSpec):
    """RoPE at explicit positions (B x L): `apply_rotary` with a fresh table."""
    return apply_rotary(x_BxLxHxK, rotary_table(positions_BxL, spec), spec)


def dense(x, w, dt, in_dims: int = 1):
    """x[..., in] @ w[in, out...] as one rank-2 matmul: (B*L, in) x (in, out).

    XLA:CPU runs the backward of rank-2 dots far faster than of batched-rank einsums (about
    1.6x on a SwiGLU block), and the reshapes are free (row-major, leading axes merged).
    """
    lead, k = x.shape[:x.ndim - in_dims], math.prod(x.shape[x.ndim - in_dims:])
    out = w.shape[in_dims:]
    y = x.reshape(-1, k) @ w.reshape(k, -1).astype(dt)
    return y.reshape(*lead, *out)


def _mean_abs(x):
    return jnp.mean(jnp.abs(x.astype(jnp.float32)))


class Attention(nn.Module):
    """Multi-head self-attention. With `kv` (this layer's cache: keys and values B x S x H x
    K and the slot to write), the new keys and values are written into the cache at that
    slot and the queries attend over the whole cache; returns (out, new kv)."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, x_BxLxD, rope, visibility, kv=None):
        s, dt = self.spec, self.spec.dtype
        hid, res = trunc_normal(s.std_hidden), trunc_normal(s.std_residual_out)
        qkv = []
        for n in ("q", "k", "v"):
            w_DxHxK = _param(self, f"w_{n}", hid, (s.d_model, s.num_heads, s.head_dim),
                             ("embed", "heads", "head_dim"))
            y = dense(x_BxLxD, w_DxHxK, dt)
            if s.qkv_bias:
                y = y + _param(self, f"b_{n}", nn.initializers.zeros, (s.num_heads, s.head_dim),
                               ("heads", "head_dim")).astype(dt)
            qkv.append(y)
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = qkv
        q_BxLxHxK = apply_rotary(q_BxLxHxK, rope, s)
        k_BxLxHxK = apply_rotary(k_BxLxHxK, rope, s)
        if kv is not None:
            k_cache, v_cache, slot = kv
            k_BxLxHxK = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BxLxHxK, slot, axis=1)
            v_BxLxHxK = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BxLxHxK, slot, axis=1)
            kv = (k_BxLxHxK, v_BxLxHxK)
        if self.is_mutable_collection("intermediates"):
            # The coordinate check's attention-logit size: the raw scores before masking
            # (fused attention never materialises them, so only a capturing call does).
            self.sow("intermediates", "attn_logits", _mean_abs(
                attention_lib.logits(q_BxLxHxK, k_BxLxHxK, s.attn_scale)))
        o_BxLxHxK = attention_lib.attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale=s.attn_scale,
                                         impl=s.attention, **visibility)
        w_HxKxD = _param(self, "w_o", res, (s.num_heads, s.head_dim, s.d_model),
                         ("heads", "head_dim", "embed"))
        out_BxLxD = dense(o_BxLxHxK, w_HxKxD, dt, in_dims=2)
        if s.out_bias:
            out_BxLxD = out_BxLxD + _param(self, "b_o", nn.initializers.zeros, (s.d_model,),
                                           ("embed",)).astype(dt)
        return out_BxLxD, kv


class MLP(nn.Module):
    spec: ModelSpec

    @nn.compact
    def __call__(self, x_BxLxD):
        s, dt = self.spec, self.spec.dtype
        hid, res = trunc_normal(s.std_hidden), trunc_normal(s.std_residual_out)
        h = {}
        for n in ("gate", "up"):
            w_DxF = _param(self, f"w_{n}", hid, (s.d_model, s.ffn_dim), ("embed", "mlp"))
            h[n] = dense(x_BxLxD, w_DxF, dt)
            if s.ffn_bias:
                h[n] = h[n] + _param(self, f"b_{n}", nn.initializers.zeros, (s.ffn_dim,),
                                     ("mlp",)).astype(dt)
        h_BxLxF = nn.silu(h["gate"]) * h["up"]
        w_FxD = _param(self, "w_down", res, (s.ffn_dim, s.d_model), ("mlp", "embed"))
        out_BxLxD = dense(h_BxLxF, w_FxD, dt)
        if s.ffn_bias:
            out_BxLxD = out_BxLxD + _param(self, "b_down", nn.initializers.zeros, (s.d_model,),
                                           ("embed",)).astype(dt)
        return out_BxLxD


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Returns (x, new
    kv) when given this layer's KV cache."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, x_BxLxD, rope, visibility, kv=None):
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        a, kv = Attention(self.spec, name="attn")(Norm(self.spec, name="attn_norm")(x_BxLxD),
                                                  rope, visibility, kv)
        self.sow("intermediates", "attn_out", _mean_abs(a))
        x_BxLxD = x_BxLxD + a
        f = MLP(self.spec, name="mlp")(Norm(self.spec, name="mlp_norm")(x_BxLxD))
        self.sow("intermediates", "mlp_out", _mean_abs(f))
        x_BxLxD = x_BxLxD + f
        self.sow("intermediates", "residual", _mean_abs(x_BxLxD))
        return x_BxLxD, kv


class ScannedBlock(nn.Module):
    """One layer as a scan body: the carry is (x, rope, visibility, cache slot); the scanned
    input
    and output are the layer's (keys, values) cache, or None without a cache."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, carry, kv_layer):
        x_BxLxD, rope, visibility, slot = carry
        kv = None if kv_layer is None else (*kv_layer, slot)
        x_BxLxD, kv = Block(self.spec, name="block")(x_BxLxD, rope, visibility, kv)
        return (x_BxLxD, rope, visibility, slot), kv


_REMAT = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """Embedding, the blocks, the final norm: final hidden states B x L x D in the compute
    dtype. The output head's params live here too (`lm_head`, unless tied), but the logits
    are computed outside the module (`logits`), so a loss or a decoder can project only the
    rows it needs.

    With a `cache` (see `init_cache`), the L tokens are written at cache slots
    cache['index'] .. + L - 1 and attend to every valid slot up to their own; returns
    (hidden, the updated cache)."""
    spec: ModelSpec

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, cache=None):
        s, dt = self.spec, self.spec.dtype
        B, L = tokens_BxL.shape
        slots_1xL = jnp.arange(L, dtype=jnp.int32)[None]
        if cache is None:
            # training and prefill: queries and keys are the same slots 0..L-1, so the fused
            # attention implementations apply (crystal/attention.py)
            kv, slot = None, None
            seg = segment_ids_BxL if s.segment_mask else None
            visibility = dict(q_segment_BxT=seg, k_segment_BxS=seg)
        else:
            kv, slot = (cache["k"], cache["v"]), cache["index"]
            q_slots_BxL = jnp.broadcast_to(slots_1xL + slot, (B, L))
            k_slots_BxS = jnp.broadcast_to(jnp.arange(cache_length(cache), dtype=jnp.int32),
                                           (B, cache_length(cache)))
            visibility = dict(q_index_BxT=q_slots_BxL, k_index_BxS=k_slots_BxS,
                              k_valid_BxS=k_slots_BxS >= cache["start"][:, None])
            if positions_BxL is None:   # a row's first valid slot is its position 0
                positions_BxL = jnp.maximum(q_slots_BxL - cache["start"][:, None], 0)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(slots_1xL, (B, L))
        rope = rotary_table(positions_BxL, s)
        emb_VxD = _param(self, "embedding", trunc_normal(s.std_embedding),
                         (s.vocab_size, s.d_model), ("vocab", "embed"))
        x_BxLxD = (jnp.take(emb_VxD, tokens_BxL, axis=0) * s.embedding_multiplier).astype(dt)
        self.sow("intermediates", "embedding", _mean_abs(x_BxLxD))

        block = ScannedBlock
        if s.remat != "none":
            block = nn.remat(block, policy=_REMAT[s.remat], prevent_cse=not s.scan_layers)
        carry = (x_BxLxD, rope, visibility, slot)
        if s.scan_layers:
            carry, kv = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                                split_rngs={"params": True}, length=s.num_layers,
                                metadata_params={nn.PARTITION_NAME: "layers"})(
                                    s, name="layers")(carry, kv)
        else:
            new = []
            for i in range(s.num_layers):
                carry, kv_i = block(s, name=f"layers_{i}")(
                    carry, None if kv is None else (kv[0][i], kv[1][i]))
                new.append(kv_i)
            kv = None if kv is None else tuple(tuple(x) for x in zip(*new))
        if not s.tie_embeddings:
            _param(self, "lm_head", trunc_normal(s.std_output), (s.d_model, s.vocab_size),
                   ("embed", "vocab"))
        h_BxLxD = Norm(s, name="final_norm")(carry[0])
        if cache is None:
            return h_BxLxD
        return h_BxLxD, dict(cache, k=kv[0], v=kv[1], index=slot + L)


def output_head(params, cfg):
    """The D x V output projection (float32 params): the tied embedding, transposed, or
    `lm_head`."""
    spec = ModelSpec.from_config(cfg)
    return params["embedding"].T if spec.tie_embeddings else params["lm_head"]


def logits(hidden_BxLxD, head_DxV, cfg):
    """Float32 logits of final hidden states (any leading shape): one rank-2 matmul in the
    compute dtype with float32 accumulation, times muP's logit multiplier."""
    spec = ModelSpec.from_config(cfg)
    *lead, D = hidden_BxLxD.shape
    out = jnp.dot(hidden_BxLxD.reshape(-1, D), head_DxV.astype(spec.dtype),
                  preferred_element_type=jnp.float32).reshape(*lead, -1)
    return out * spec.logit_multiplier


# ----------------------------------------------------------------------------- functional API


def _module(cfg) -> Transformer:
    return Transformer(ModelSpec.from_config(cfg))


def init(cfg, key) -> dict:
    """Fresh float32 params (a plain nested dict) for `cfg`."""
    boxed = _init_boxed(cfg, key)
    return nn.meta.unbox(boxed)


def _init_boxed(cfg, key):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return _module(cfg).init(key, tokens)["params"]


def abstract_params(cfg):
    """Shapes and dtypes of the params, by abstract evaluation (no allocation)."""
    return jax.eval_shape(lambda k: init(cfg, k), jax.random.key(0))


def logical_axes(cfg):
    """A pytree like the params whose leaves are PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(lambda k: _init_boxed(cfg, k), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def init_cache(cfg, batch: int, length: int, start_B=None) -> dict:
    """An empty KV cache of `length` slots for `batch` rows: keys and values (compute dtype,
    B x S x H x K per layer; stacked on a leading layers axis when layers are scanned, a
    tuple of per-layer arrays when unrolled), the next slot to write (`index`) and each
    row's first valid slot (`start`: a left-padded prompt's first real token; the slots
    before it are never attended to). Rotary positions count from `start`."""
    spec = ModelSpec.from_config(cfg)
    shape = (batch, length, spec.num_heads, spec.head_dim)
    if spec.scan_layers:
        k = v = jnp.zeros((spec.num_layers, *shape), spec.dtype)
    else:
        k = v = tuple(jnp.zeros(shape, spec.dtype) for _ in range(spec.num_layers))
    start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B,
                                                                                 jnp.int32)
    return dict(k=k, v=v, index=jnp.zeros([], jnp.int32), start=start_B)


def cache_length(cache) -> int:
    """The number of slots S of a KV cache."""
    return cache["k"][0].shape[1]   # layer 0's B x S x H x K, in either layout


def hidden(params, tokens_BxL, cfg, positions_BxL=None, segment_ids_BxL=None,
           capture_intermediates: bool = False, cache=None):
    """Final hidden states (B x L x D, compute dtype, after the final norm). Pure.

    With capture_intermediates, returns (hidden, {name: mean |activation|}) for the muP
    coordinate check; scanned layers give one value per layer. With a KV `cache`
    (`init_cache`), the tokens go into the cache at its `index` and the call returns
    (hidden, the updated cache): prefill with the prompt, then one token per call."""
    mod = _module(cfg)
    if cache is not None:
        return mod.apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL,
                         cache)
    if capture_intermediates:
        h, state = mod.apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL,
                             mutable=["intermediates"])
        return h, dict(state["intermediates"])
    return mod.apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL)


def apply(params, tokens_BxL, cfg, positions_BxL=None, segment_ids_BxL=None,
          capture_intermediates: bool = False):
    """Logits (float32, B x L x V): `logits(hidden(...))`. Pure; jit it (or call inside a
    jitted step). With capture_intermediates, returns (logits, intermediates), the output
    logits' mean |value| among them."""
    out = hidden(params, tokens_BxL, cfg, positions_BxL, segment_ids_BxL,
                 capture_intermediates)
    h, inter = out if capture_intermediates else (out, None)
    logits_BxLxV = logits(h, output_head(params, cfg), cfg)
    if not capture_intermediates:
        return logits_BxLxV
    inter["output_logits"] = (_mean_abs(logits_BxLxV),)
    return logits_BxLxV, inter


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
