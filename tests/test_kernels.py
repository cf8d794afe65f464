"""The attention core (crystal/attention.py) and the chunked output projection + loss
(crystal/train/loss.py): every implementation computes the same function and gradient as
the plain formula, and the memory-saving ones never build the arrays they exist to avoid."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crystal import attention
from crystal import config as config_lib
from crystal import model as model_lib
from crystal.errors import ConfigError
from crystal.train import loss as loss_lib
from crystal.train import step as step_lib

B, T, H, K = 2, 256, 2, 16
SCALE = 1 / K   # muP's 1/head_dim


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(3)]


def _segments():
    # three packed documents per row, boundaries inside and across the query blocks
    return jnp.asarray([[0] * 40 + [1] * 150 + [2] * 66, [0] * 128 + [1] * 1 + [2] * 127],
                       jnp.int32)


def _reference(q, k, v, seg):
    """softmax(q k^T x scale) v under the causal (and document) mask, written out."""
    s = jnp.einsum("bqhk,bshk->bhqs", q, k) * SCALE
    m = jnp.tril(jnp.ones((T, T), bool))[None, None]
    if seg is not None:
        m = m & (seg[:, :, None] == seg[:, None, :])[:, None]
    return jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(jnp.where(m, s, -jnp.inf), -1), v)


@pytest.mark.parametrize("segments", [False, True])
def test_attention_implementations_match_the_formula_and_its_gradient(segments):
    q, k, v = _qkv()
    seg = _segments() if segments else None
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, K)), jnp.float32)
    want, want_vjp = jax.vjp(lambda *x: _reference(*x, seg), q, k, v)
    for impl in ("xla", "blocked"):
        f = jax.jit(lambda q, k, v: attention.attend(q, k, v, scale=SCALE, impl=impl,
                                                     q_segment_BxT=seg, k_segment_BxS=seg))
        got, vjp = jax.vjp(f, q, k, v)
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=impl)
        for g, w in zip(vjp(ct), want_vjp(ct)):
            np.testing.assert_allclose(g, w, atol=2e-5, err_msg=impl)


def test_explicit_slot_indices_serve_cached_decoding():
    """Queries at slots 250..255 against all 256 keys (a decoder's step), or against a
    cache whose later slots are empty, see exactly what the training call saw there."""
    q, k, v = _qkv()
    seg = _segments()
    attend = jax.jit(attention.attend, static_argnames=("scale", "impl"))
    full = attend(q, k, v, scale=SCALE, impl="blocked", q_segment_BxT=seg, k_segment_BxS=seg)
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    tail = attend(q[:, -6:], k, v, scale=SCALE, q_index_BxT=idx[:, -6:],
                            k_index_BxS=idx, q_segment_BxT=seg[:, -6:], k_segment_BxS=seg)
    np.testing.assert_allclose(tail, full[:, -6:], atol=2e-6)
    # a 300-slot cache filled up to slot 255: garbage in the empty slots changes nothing
    junk = jnp.full((B, 44, H, K), 1e3, jnp.float32)
    kc, vc = jnp.concatenate([k, junk], 1), jnp.concatenate([v, junk], 1)
    kidx = jnp.broadcast_to(jnp.arange(300, dtype=jnp.int32), (B, 300))
    cached = attend(q[:, 100:101], kc, vc, scale=SCALE, q_index_BxT=idx[:, 100:101],
                              k_index_BxS=jnp.where(kidx < T, kidx, 0),
                              k_valid_BxS=kidx < T)
    plain = attend(q, k, v, scale=SCALE)   # no documents: 'auto', the blocked kernel here
    np.testing.assert_allclose(cached, plain[:, 100:101], atol=2e-6)


def test_blocked_attention_never_builds_the_square_and_auto_picks_it_on_cpu():
    q, k, v = _qkv()
    assert attention.resolve("auto", jnp.float32, K) == "blocked"
    assert attention.resolve("xla", jnp.float32, K) == "xla"

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention.attend(q, k, v, scale=SCALE, impl=impl) ** 2)
    shapes = {impl: set(re.findall(r"f32\[([\d,]+)\]", jax.jit(jax.grad(loss(impl), (0, 1, 2)))
                                   .lower(q, k, v).compile().as_text()))
              for impl in ("xla", "blocked")}
    square = f"{B},{H},{T},{T}"
    assert square in shapes["xla"]                  # the plain path materialises it
    assert not any(s.endswith(f"{T},{T}") for s in shapes["blocked"]), shapes["blocked"]


# ----------------------------------------------------------------------------- the loss

D, V, L = 32, 300, 96
MULT = 0.55   # a muP logit multiplier


def _head_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((2, L, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((D, V)) * 0.3, jnp.float32),
            jnp.asarray(rng.integers(0, V, (2, L)), jnp.int32),
            jnp.asarray(rng.standard_normal((2, L)), jnp.float32))


def _direct(h, w, t):
    """Per-token cross-entropy and sum |logit| of materialised logits."""
    z = jnp.einsum("bld,dv->blv", h, w) * MULT
    tok = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, t[..., None], -1)[..., 0]
    return tok, jnp.sum(jnp.abs(z))


def test_chunked_cross_entropy_is_the_formula_and_its_gradient():
    """Whole, dividing and non-dividing chunks: the same per-token losses and mean |logit|,
    and the same gradients of both (a weighted loss sum plus the |logit| sum)."""
    h, w, t, wt = _head_inputs()

    def objective(f):
        def obj(h, w):
            tok, abs_sum = f(h, w)
            return jnp.sum(tok * wt) + 0.1 * abs_sum
        return jax.jit(jax.value_and_grad(obj, (0, 1)))
    want_tok, want_abs = _direct(h, w, t)
    want, g_want = objective(lambda h, w: _direct(h, w, t))(h, w)
    for chunk in (0, 32, 40):
        def chunked(h, w):
            return loss_lib.cross_entropy(h, w, t, multiplier=MULT, dtype=jnp.float32,
                                          chunk=chunk, with_abs=True)
        tok, abs_sum = jax.jit(chunked)(h, w)
        np.testing.assert_allclose(tok, want_tok, rtol=1e-5, err_msg=str(chunk))
        assert float(abs_sum) == pytest.approx(float(want_abs), rel=1e-5)
        got, g_got = objective(chunked)(h, w)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
        for a, b in zip(g_got, g_want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(chunk))
    assert loss_lib.chunk_len(96, 40) == 32 and loss_lib.chunk_len(96, 0) == 96


def test_chunked_loss_never_builds_the_batch_logits():
    h, w, t, _ = _head_inputs()
    f = jax.grad(lambda h, w: jnp.sum(loss_lib.cross_entropy(
        h, w, t, multiplier=MULT, dtype=jnp.float32, chunk=32)[0]), (0, 1))
    hlo = jax.jit(f).lower(h, w).compile().as_text()
    assert f"f32[2,32,{V}]" in hlo and f"[2,{L},{V}]" not in hlo


def test_token_losses_and_capture_through_the_model():
    """The train step's loss is the model's logits' cross-entropy, and the coordinate
    check's captured mean |logit| and attention logits are still there."""
    cfg = config_lib.load("crystalcoder_tiny", {"model.num_layers": 1,
                                                "model.loss_chunk": 32})
    spec = model_lib.ModelSpec.from_config(cfg)
    params = jax.jit(model_lib.init, static_argnums=0)(spec, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = dict(inputs=rng.integers(3, 2000, (2, L)).astype(np.int32),
                 targets=rng.integers(3, 2000, (2, L)).astype(np.int32),
                 loss_mask=(rng.random((2, L)) > 0.2).astype(np.float32))
    tok, mask, inter = jax.jit(lambda p: step_lib.token_losses(p, batch, spec, capture=True)
                               )(params)
    lg = jax.jit(model_lib.apply, static_argnums=2)(params, batch["inputs"], spec)
    want = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, batch["targets"][..., None],
                                                          -1)[..., 0]
    np.testing.assert_allclose(tok, want * batch["loss_mask"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mask, batch["loss_mask"])
    assert float(inter["output_logits"][0]) == pytest.approx(float(jnp.mean(jnp.abs(lg))),
                                                             rel=1e-5)
    assert "attn_logits" in inter["layers"]["block"]["attn"]


@pytest.mark.parametrize("over,field", [
    ({"model.attention": "flash"}, "model.attention"),
    ({"model.attention": "cudnn"}, "model.attention"),            # float32 compute
    ({"model.loss_chunk": 48}, "model.loss_chunk"),               # 128 % 48
    ({"model.loss_chunk": -1}, "model.loss_chunk"),
])
def test_bad_kernel_settings_name_the_field(over, field):
    with pytest.raises(ConfigError, match=f"config field {field}"):
        config_lib.load("crystalcoder_tiny", over)
