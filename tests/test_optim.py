"""The LLM360 schedules (numbers from llm360.md), muP LR groups and the weight-decay rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crystal import config, model, optim
from crystal.mup import param_class


def lr(cfg, stage, t):
    return float(optim.schedule(config.stage(cfg, stage))(t))


def test_crystalcoder_7b_stage_schedules_line_up():
    cfg = config.load("crystalcoder_7b")
    s1, s2, s3 = (config.stage(cfg, n) for n in (1, 2, 3))
    # Stage 1: warmup 86 steps to 0.012, then down its 294,337-step line ...
    assert lr(cfg, 1, 0) == pytest.approx(0.012 / 86, rel=1e-6)
    assert lr(cfg, 1, 85) == pytest.approx(0.012, rel=1e-6)
    assert lr(cfg, 1, 86) == pytest.approx(0.012, rel=1e-6)
    # ... stopped at step 79,721, where the line stood at stage 2's peak 0.0087825.
    last1 = lr(cfg, 1, s1.steps - 1)
    assert last1 == pytest.approx(0.0087825, rel=1e-3)
    assert s2.schedule.peak_lr == pytest.approx(last1, rel=1e-3)
    # Had it continued to the end of the line, it would have reached 1.2408e-4.
    assert lr(cfg, 1, 86 + 294_337) == pytest.approx(1.2408e-4, rel=1e-5)
    # Stage 2 re-warms over 86 steps to that value and ends at 1.3679e-4.
    assert lr(cfg, 2, 85) == pytest.approx(0.0087825, rel=1e-6)
    assert lr(cfg, 2, s2.steps - 1) == pytest.approx(1.3679e-4, rel=1e-3)
    # Stage 3: 276 warmup steps to 0.002, linear to 2e-4 at its end.
    assert lr(cfg, 3, 275) == pytest.approx(0.002, rel=1e-6)
    assert lr(cfg, 3, s3.steps - 1) == pytest.approx(2e-4, rel=1e-3)
    # Linear, not cosine: the midpoint of stage 3's line is the mean of its ends.
    assert lr(cfg, 3, 276 + 27_452 // 2) == pytest.approx((0.002 + 2e-4) / 2, rel=1e-4)


def test_amber_cosine_schedule():
    cfg = config.load("amber_7b")
    assert lr(cfg, 1, 999) == pytest.approx(1.5e-4, rel=1e-6)      # half-way up
    assert lr(cfg, 1, 1999) == pytest.approx(3e-4, rel=1e-6)
    mid = 2000 + (274_658 - 2000) // 2
    assert lr(cfg, 1, mid) == pytest.approx((3e-4 + 3e-5) / 2, rel=1e-4)
    assert lr(cfg, 1, 274_658) == pytest.approx(3e-5, rel=1e-6)     # cosine to 10%
    assert lr(cfg, 1, 10**7) == pytest.approx(3e-5, rel=1e-6)


def test_tiny_config_keeps_the_7b_shape():
    cfg = config.load("crystalcoder_tiny")
    s1, s2 = config.stage(cfg, 1), config.stage(cfg, 2)
    stood = lr(cfg, 1, s1.steps - 1)
    assert stood < 0.9 * s1.schedule.peak_lr                        # stopped part-way down
    assert s2.schedule.peak_lr == pytest.approx(stood, rel=2e-2)    # stage 2 re-warms there
    sc = s2.schedule                                                # ... and ends its line
    one_step = (sc.peak_lr - sc.end_lr) / sc.decay_steps
    assert abs(lr(cfg, 2, s2.steps - 1) - sc.end_lr) <= 1.5 * one_step


def _tiny(**over):
    base = {"model.num_layers": 1, "model.d_model": 64, "model.num_heads": 2,
            "model.ffn_dim": 96}
    base.update(over)
    return config.load("crystalcoder_tiny", base)


def _params(cfg, value=None):
    """Params of cfg's shapes without running the (eager, slow) flax init."""
    if value is None:
        return model.init(cfg, jax.random.key(0))
    return jax.tree.map(lambda a: jnp.full(a.shape, value, a.dtype), model.abstract_params(cfg))


def _update(opt, grads, params):
    return jax.jit(lambda g, p: opt.update(g, opt.init(p), p))(grads, params)


def _classes(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: param_class(tuple(k.key for k in p)), params)


@pytest.mark.parametrize("mask", ["matrices", "all"])
def test_weight_decay_rule_keeps_lr_times_wd_per_class(mask):
    """With zero gradients an AdamW step is pure decay: p <- p (1 - lr_c wd_c). muP scales
    hidden LRs by the width scale and their decay by its inverse, so every decayed class
    shrinks by the same factor lr x wd; norms and biases only under wd_mask='all'."""
    cfg = _tiny(**{"optim.wd_mask": mask, "optim.weight_decay": 0.1})
    params = _params(cfg, 1.5)
    opt = optim.make_optimizer(cfg, 1)
    upd, _ = _update(opt, jax.tree.map(jnp.zeros_like, params), params)
    base = lr(cfg, 1, 0)
    ratio = jax.tree.map(lambda u, p: float(jnp.mean(-u / p)), upd, params)
    cls = _classes(params)
    seen = set()
    for r, c in zip(jax.tree.leaves(ratio), jax.tree.leaves(cls)):
        seen.add(c)
        want = 0.0 if (mask == "matrices" and c == "vector") else base * 0.1
        assert r == pytest.approx(want, rel=1e-5, abs=1e-12), c
    assert {"hidden", "residual_out", "embedding", "vector"} <= seen


def test_mup_lr_groups_scale_hidden_matrices_only():
    """Adam's first step moves each weight by ~lr_c (|m/sqrt(v)| = 1): hidden matrices by
    base LR x width scale (128/32 -> 1/4 in the tiny config), embeddings and vectors by the
    base LR."""
    cfg = config.load("crystalcoder_tiny", {"model.num_layers": 1, "optim.weight_decay": 0.0})
    params = _params(cfg, 0.5)
    opt = optim.make_optimizer(cfg, 1)
    upd, _ = _update(opt, jax.tree.map(jnp.ones_like, params), params)
    base = lr(cfg, 1, 0)
    want = {"hidden": base / 4, "residual_out": base / 4, "embedding": base, "vector": base}
    for u, c in zip(jax.tree.leaves(upd), jax.tree.leaves(_classes(params))):
        assert float(jnp.mean(jnp.abs(u))) == pytest.approx(want[c], rel=1e-4), c
    groups = optim.group_lrs(cfg, base)
    assert groups["base"] == base and groups["hidden"] == pytest.approx(base / 4)


def test_sp_config_has_one_lr_group():
    cfg = config.load("amber_tiny", {"model.num_layers": 1, "optim.weight_decay": 0.0})
    params = _params(cfg, 0.5)
    opt = optim.make_optimizer(cfg, 1)
    upd, _ = _update(opt, jax.tree.map(jnp.ones_like, params), params)
    for u in jax.tree.leaves(upd):
        assert float(jnp.mean(jnp.abs(u))) == pytest.approx(lr(cfg, 1, 0), rel=1e-4)


def test_global_norm_clipping():
    """Gradients are clipped to global norm clip_norm before Adam: with a tiny eps the
    first-step update is sign-like either way, so check the clip on the second moment."""
    cfg = _tiny(**{"optim.clip_norm": 1.0})
    params = _params(cfg, 0.5)
    opt = optim.make_optimizer(cfg, 1)
    _, st = _update(opt, jax.tree.map(lambda p: jnp.full_like(p, 10.0), params), params)
    nu = [x for x in jax.tree.leaves(st[1].nu)]
    total = np.sqrt(sum(float(jnp.sum(n)) for n in nu) / (1 - 0.95))
    assert total == pytest.approx(1.0, rel=1e-4)        # sqrt(sum g^2) of the clipped grads


def test_restart_schedule_keeps_adam_moments():
    cfg = _tiny()
    params = _params(cfg, 0.5)
    opt = optim.make_optimizer(cfg, 1)
    st = opt.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    upd = jax.jit(opt.update)
    for _ in range(3):
        _, st = upd(g, st, params)
    assert int(optim.schedule_count(st)) == 3
    st2 = optim.restart_schedule(st, config.stage(cfg, 2))
    assert int(optim.schedule_count(st2)) == 0
    assert float(optim.current_lr(st2)) == pytest.approx(lr(cfg, 2, 0), rel=1e-6)
    assert int(st2[1].count) == 3                        # Adam bias correction continues
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), st2[1].mu, st[1].mu))
