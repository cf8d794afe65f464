"""The model's knobs do what the config says: norms, biases, rotary, tying, muP, scan/remat,
dtypes, document masks, causality, init stds and logical axes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import random_params

from crystal import config as config_lib
from crystal.interop import hf_classes, tree
from crystal import model as model_lib
from crystal import mup as mup_lib

B, L = 2, 16
_apply = jax.jit(model_lib.apply, static_argnums=2)
_init = jax.jit(model_lib.init, static_argnums=0)


def spec_of(cfg):
    return model_lib.ModelSpec.from_config(cfg)


def init(cfg, seed=0):
    return _init(spec_of(cfg), jax.random.key(seed))


def logits(params, tokens, cfg, positions=None, segments=None):
    return np.asarray(_apply(params, jnp.asarray(tokens), spec_of(cfg), positions, segments))


def tokens_(seed=0, shape=(B, L), vocab=2000):
    return np.asarray(np.random.default_rng(seed).integers(3, vocab, shape), np.int32)


@pytest.fixture(scope="module")
def cc():
    cfg = config_lib.load("crystalcoder_tiny")
    return cfg, random_params(cfg)


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_matches_formula(kind):
    cfg = config_lib.load("crystalcoder_tiny", {"model.norm": kind,
                                                "model.norm_bias": kind == "layernorm"})
    s = spec_of(cfg)
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((B, L, s.d_model)) + 1).astype(np.float32)
    p = {"scale": rng.standard_normal(s.d_model).astype(np.float32)}
    if kind == "layernorm":
        p["bias"] = rng.standard_normal(s.d_model).astype(np.float32)
        want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + s.norm_eps)
        want = want * p["scale"] + p["bias"]
    else:
        want = x / np.sqrt((x * x).mean(-1, keepdims=True) + s.norm_eps) * p["scale"]
    got = model_lib.Norm(s).apply({"params": p}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- biases, tying


def _names(tree):
    return {"/".join(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("flag,names", [
    ("qkv_bias", {"attn/b_q", "attn/b_k", "attn/b_v"}),
    ("out_bias", {"attn/b_o"}),
    ("ffn_bias", {"mlp/b_gate", "mlp/b_up", "mlp/b_down"}),
    ("norm_bias", {"attn_norm/bias", "mlp_norm/bias"}),
])
def test_bias_flags_add_exactly_their_params(flag, names):
    off = dict(qkv_bias=False, out_bias=False, ffn_bias=False, norm_bias=False)
    ov = {f"model.{k}": v for k, v in off.items()}
    a = _names(model_lib.abstract_params(config_lib.load("crystalcoder_tiny", ov)))
    b = _names(model_lib.abstract_params(
        config_lib.load("crystalcoder_tiny", {**ov, f"model.{flag}": True})))
    assert b - a == {f"layers/block/{n}" for n in names} | (
        {"final_norm/bias"} if flag == "norm_bias" else set())
    assert a <= b


def test_biases_are_used(cc):
    cfg, p = cc
    toks = tokens_()
    base = logits(p, toks, cfg)
    for group, name in (("attn", "b_q"), ("attn", "b_o"), ("mlp", "b_up"), ("mlp", "b_down"),
                        ("attn_norm", "bias")):
        q = jax.tree.map(lambda x: x, p)
        b = q["layers"]["block"][group][name]  # not a constant: LayerNorm removes those
        q["layers"]["block"][group][name] = b + np.random.default_rng(1).normal(0, 0.5, b.shape)
        assert np.abs(logits(q, toks, cfg) - base).max() > 1e-3, name


UNTIED = {"model.tie_embeddings": False}


def test_tied_head_is_the_embedding(cc):
    tied, pt = cc
    untied = config_lib.load("crystalcoder_tiny", UNTIED)
    assert "lm_head" not in pt
    pu = dict(pt, lm_head=pt["embedding"].T)
    toks = tokens_()
    np.testing.assert_allclose(logits(pt, toks, tied), logits(pu, toks, untied),
                               rtol=1e-5, atol=1e-5)
    V, D = untied.model.vocab_size, untied.model.d_model
    assert (model_lib.param_count(model_lib.abstract_params(untied))
            - model_lib.param_count(model_lib.abstract_params(tied))) == V * D


# ----------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_rotary_is_relative_and_partial(pairing, fraction):
    cfg = config_lib.load("crystalcoder_tiny", {"model.rotary_pairing": pairing,
                                                "model.rotary_fraction": fraction})
    s = spec_of(cfg)
    r, K = s.rotary_dims, s.head_dim
    assert r == int(fraction * K)
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, K)), jnp.float32) for _ in range(2))

    def rot(x, pos):
        return model_lib.rotary(x, jnp.full((1, 1), pos, jnp.int32), s)[0, 0, 0]

    # position 0 is the identity; dims past rotary_dims never rotate
    np.testing.assert_allclose(rot(q, 0), q[0, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(rot(q, 37)[r:], q[0, 0, 0, r:])
    assert np.abs(rot(q, 37)[:r] - q[0, 0, 0, :r]).max() > 1e-2
    # scores depend on the offset only
    dot = lambda m, n: float(jnp.dot(rot(q, m), rot(k, n)))  # noqa: E731
    assert dot(7, 3) == pytest.approx(dot(24, 20), abs=1e-4)
    assert abs(dot(7, 3) - dot(7, 5)) > 1e-3


def test_interleaved_is_rotate_half_after_the_hf_permutation():
    """The permutation crystal.interop uses is the exact change of layout."""
    c_i = config_lib.load("crystalcoder_tiny")  # 8 of 32 dims, interleaved
    c_h = config_lib.load("crystalcoder_tiny", {"model.rotary_pairing": "half"})
    s_i, s_h = spec_of(c_i), spec_of(c_h)
    perm = hf_classes.rotary_perm(s_i)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, 4, s_i.head_dim)),
                    jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    np.testing.assert_allclose(model_lib.rotary(x, pos, s_i)[..., perm],
                               model_lib.rotary(x[..., perm], pos, s_h), atol=1e-5)


# ----------------------------------------------------------------------------- muP


def test_mup_multipliers_and_attention_scale():
    s = spec_of(config_lib.load("crystalcoder_tiny"))
    assert s.embedding_multiplier == 14.6
    assert s.logit_multiplier == pytest.approx(2.22 * 32 / 128)
    assert s.attn_scale == pytest.approx(1 / 32)            # 1/head_dim under muP
    sp = spec_of(config_lib.load("amber_tiny"))
    assert (sp.embedding_multiplier, sp.logit_multiplier) == (1.0, 1.0)
    assert sp.attn_scale == pytest.approx(32 ** -0.5)


def test_embedding_and_logit_multipliers():
    """Untied: embedding multiplier m on E computes what multiplier 1 on m x E computes,
    and doubling output_alpha doubles the logits."""
    cfg = config_lib.load("crystalcoder_tiny", UNTIED)
    other = config_lib.load("crystalcoder_tiny", {**UNTIED, "mup.embedding_multiplier": 1.0,
                                                  "mup.output_alpha": 2 * 2.22})
    p = random_params(cfg)
    toks = tokens_()
    want = 2 * logits(p, toks, cfg)
    np.testing.assert_allclose(logits(dict(p, embedding=p["embedding"] * 14.6), toks, other),
                               want, rtol=1e-4, atol=1e-4)
    assert np.abs(logits(p, toks, other) - want).max() > 1e-2


_TRUNC2 = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))


def test_mup_init_stds_follow_the_rules():
    """Empirical std of each class = rule std x the std of a 2-sigma truncated normal."""
    width = 256  # muP width multiplier 8 over base width 32
    cfg = config_lib.load("crystalcoder_tiny", {"model.d_model": width, **UNTIED})
    rules = mup_lib.rules(cfg)
    p = init(cfg)
    by_class: dict = {}
    for path, x in jax.tree_util.tree_flatten_with_path(p)[0]:
        keys = tuple(str(k.key) for k in path)
        by_class.setdefault(mup_lib.param_class(keys), []).append(np.asarray(x).ravel())
    for cls in ("embedding", "hidden", "residual_out", "output"):
        x = np.concatenate(by_class[cls])
        want = rules.init_std[cls]
        assert x.std() == pytest.approx(want * _TRUNC2, rel=0.03), cls
        assert np.abs(x).max() <= 2 * want * (1 + 1e-6), cls       # cut at 2 sigma
    assert rules.init_std["hidden"] == pytest.approx(0.073 * math.sqrt(32 / width))
    assert rules.init_std["residual_out"] == pytest.approx(rules.init_std["hidden"] / 2)
    vec = np.concatenate(by_class["vector"])                         # gains 1, biases 0
    assert set(np.unique(vec)) == {0.0, 1.0}


# ----------------------------------------------------------------------------- layers, remat


def test_scan_and_unrolled_layers_agree(cc):
    cfg, p = cc
    cfg_u = config_lib.load("crystalcoder_tiny", {"model.scan_layers": False})
    p_u = tree.with_layout(jax.tree.map(np.asarray, p), scan_layers=False)
    assert jax.tree.map(np.shape, p_u) == jax.tree.map(lambda s: s.shape,
                                                       model_lib.abstract_params(cfg_u))
    toks = tokens_()
    np.testing.assert_allclose(logits(p_u, toks, cfg_u), logits(p, toks, cfg), rtol=1e-5,
                               atol=1e-5)


def _loss_and_grad(params, toks, cfg):
    spec = spec_of(cfg)

    def loss(p):
        lg = model_lib.apply(p, toks[:, :-1], spec)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), toks[:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_give_the_same_loss_and_grads(cc):
    """Every policy against no remat: the same forward (loss of the logits) and grads."""
    _, p = cc
    toks = jnp.asarray(tokens_(shape=(B, L + 1)))
    ref_l, ref_g = _loss_and_grad(p, toks, config_lib.load("crystalcoder_tiny"))
    assert float(ref_l) > 0
    for policy in config_lib.REMAT_POLICIES[1:]:
        assert policy != "none"
        lv, g = _loss_and_grad(p, toks, config_lib.load("crystalcoder_tiny",
                                                        {"model.remat": policy}))
        assert float(lv) == pytest.approx(float(ref_l), rel=1e-6), policy
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     g, ref_g)


def test_bfloat16_compute_keeps_float32_params_and_logits(cc):
    cfg, p = cc
    cfg_bf = config_lib.load("crystalcoder_tiny", {"model.compute_dtype": "bfloat16"})
    p_bf = model_lib.abstract_params(cfg_bf)
    assert {x.dtype for x in jax.tree.leaves(p_bf)} == {jnp.dtype("float32")}
    toks = tokens_()
    lb, lf = logits(p, toks, cfg_bf), logits(p, toks, cfg)
    assert lb.dtype == np.float32 and np.isfinite(lb).all()
    err = np.abs(lb - lf).max() / np.abs(lf).max()
    assert 0 < err < 0.05            # bf16 rounding, not a different model


# ----------------------------------------------------------------------------- masks


def test_causal_future_tokens_do_not_change_the_past(cc):
    cfg, p = cc
    toks = tokens_()
    t = 9
    toks2 = toks.copy()
    toks2[:, t] = (toks2[:, t] + 17) % 2000
    a, b = logits(p, toks, cfg), logits(p, toks2, cfg)
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-3


def test_segment_mask_blocks_attention_across_documents(cc):
    """Packed [doc A | doc B] with positions restarting: with segment_mask on, each doc's
    logits equal that doc alone (row 1: B first, then filler the causal mask hides);
    off (the default) B attends to A."""
    cfg_off, p = cc
    assert config_lib.base_config().model.segment_mask is False
    cfg_on = config_lib.load("crystalcoder_tiny", {"model.segment_mask": True})
    la, lb = 6, 10
    a, b = tokens_(1, (la,)), tokens_(2, (lb,))
    toks = np.stack([np.concatenate([a, b]), np.concatenate([b, a])])
    seg = jnp.asarray([[0] * la + [1] * lb, [0] * (la + lb)], jnp.int32)
    pos = jnp.asarray([list(range(la)) + list(range(lb)), list(range(la + lb))], jnp.int32)
    on = logits(p, toks, cfg_on, pos, seg)
    off = logits(p, toks, cfg_off, pos, seg)
    np.testing.assert_allclose(on[0, la:], on[1, :lb], rtol=1e-5, atol=1e-5)   # B == alone
    np.testing.assert_allclose(on[0, :la], off[0, :la], rtol=1e-5, atol=1e-5)  # A: causal
    assert np.abs(off[0, la:] - on[1, :lb]).max() > 1e-3                       # off: leaks


# ----------------------------------------------------------------------------- logical axes


@pytest.mark.parametrize("name,scan", [("amber_tiny", True), ("crystalcoder_tiny", True),
                                       ("crystalcoder_tiny", False)])
def test_every_param_has_logical_axes(name, scan):
    cfg = config_lib.load(name, {"model.scan_layers": scan})
    shapes = model_lib.abstract_params(cfg)
    axes = model_lib.logical_axes(cfg)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_s = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_a = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_spec)[0]
    assert [k for k, _ in flat_s] == [k for k, _ in flat_a]
    known = set(cfg.mesh.rules.keys())
    for (path, s), (_, a) in zip(flat_s, flat_a):
        assert len(a) == len(s.shape) and all(n in known for n in a), (path, a)
        if scan and "layers" in str(path[0]):
            assert a[0] == "layers"
