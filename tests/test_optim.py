"""The LLM360 schedules (numbers from llm360.md), muP LR groups, the weight-decay rules, the
AdamW LLM360 ran (Cerebras Model Zoo 1.9.1) against its formulas, the loss denominator."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crystal import config, model, optim
from crystal.mup import param_class
from crystal.train import step as step_lib


def lr(cfg, stage, t):
    return float(optim.schedule(config.stage(cfg, stage), cfg.optim.schedule_index)(t))


def test_crystalcoder_7b_stage_schedules_line_up():
    cfg = config.load("crystalcoder_7b")
    s1, s2, s3 = (config.stage(cfg, n) for n in (1, 2, 3))
    # Stage 1: warmup 86 steps to 0.012 (Cerebras' list read at the step before each
    # update: the first update has LR 0), then down its 294,337-step line ...
    assert lr(cfg, 1, 0) == 0.0
    assert lr(cfg, 1, 1) == pytest.approx(0.012 / 86, rel=1e-6)
    assert lr(cfg, 1, 85) == pytest.approx(0.012 * 85 / 86, rel=1e-6)
    assert lr(cfg, 1, 86) == pytest.approx(0.012, rel=1e-6)
    # ... stopped at step 79,721, where the line stood at stage 2's peak 0.0087825.
    last1 = lr(cfg, 1, s1.steps - 1)
    assert last1 == pytest.approx(0.0087825, rel=1e-3)
    assert s2.schedule.peak_lr == pytest.approx(last1, rel=1e-3)
    # Had it continued to the end of the line, it would have reached 1.2408e-4.
    assert lr(cfg, 1, 86 + 294_337) == pytest.approx(1.2408e-4, rel=1e-5)
    # Stage 2 re-warms over 86 steps to that value and ends at 1.3679e-4.
    assert lr(cfg, 2, 86) == pytest.approx(0.0087825, rel=1e-6)
    assert lr(cfg, 2, s2.steps - 1) == pytest.approx(1.3679e-4, rel=1e-3)
    # Stage 3: 276 warmup steps to 0.002, linear to 2e-4 at its end.
    assert lr(cfg, 3, 276) == pytest.approx(0.002, rel=1e-6)
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


def test_schedule_index_update_or_step():
    """'update': the k-th update reads the warmup at k (no update wasted at LR 0); 'step'
    (Cerebras): at k - 1. Past warmup both read the same line."""
    cfg = config.load("crystalcoder_tiny", {"optim.schedule_index": "update"})
    s = config.stage(cfg, 1)
    w, peak = s.schedule.warmup_steps, s.schedule.peak_lr
    step = optim.schedule(s, "step")
    for t in range(w + 3):
        want_step = peak * t / w if t < w else lr(cfg, 1, t)
        assert float(step(t)) == pytest.approx(want_step, rel=1e-6, abs=0)
        if t < w:
            assert lr(cfg, 1, t) == pytest.approx(peak * (t + 1) / w, rel=1e-6)


def _tiny(**over):
    base = {"model.num_layers": 1, "model.d_model": 64, "model.num_heads": 2,
            "model.ffn_dim": 96, "optim.schedule_index": "update"}
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
    hidden LRs by the width scale and (optim.rule='mup') their decay by its inverse, so
    every decayed class shrinks by the same factor lr x wd; norms and biases only under
    wd_mask='all'."""
    cfg = _tiny(**{"optim.wd_mask": mask, "optim.weight_decay": 0.1, "optim.rule": "mup"})
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


def test_cerebras_rule_couples_decay_to_the_group_lr():
    """LLM360's rule: decay wd as is, times the group's LR, so the hidden matrices (LR x
    width scale, 64/32 -> 1/2 here) shrink by half of what the embedding does; biases and
    norms not at all."""
    cfg = _tiny(**{"optim.weight_decay": 0.1, "optim.rule": "cerebras"})
    params = _params(cfg, 1.5)
    upd, _ = _update(optim.make_optimizer(cfg, 1), jax.tree.map(jnp.zeros_like, params),
                     params)
    base = lr(cfg, 1, 0)
    want = {"hidden": base * 0.5 * 0.1, "residual_out": base * 0.5 * 0.1,
            "embedding": base * 0.1, "vector": 0.0}
    for u, p, c in zip(jax.tree.leaves(upd), jax.tree.leaves(params),
                       jax.tree.leaves(_classes(params))):
        assert float(jnp.mean(-u / p)) == pytest.approx(want[c], rel=1e-5, abs=1e-12), c


def _hand_cerebras_adamw(cfg, params, grads_seq):
    """Cerebras Model Zoo 1.9.1's AdamW as LLM360 ran it, from the formulas in
    shared/reference/llm360.md, in float64: clip to global norm, m and v, u = m / (sqrt(v)
    + eps) x sqrt(1 - b2^k) / (1 - b1^k), p <- p - lr_g (u + wd_g p) with lr_g = the LR
    list at step k - 1 x the group multiplier; groups by name."""
    o, s = cfg.optim, config.stage(cfg, 1).schedule
    scale = cfg.mup.base_width / cfg.model.d_model
    flat = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in flat.items()}
    v = {k: np.zeros_like(x) for k, x in flat.items()}
    for k, grads in enumerate(grads_seq, start=1):
        g = {n: np.asarray(x, np.float64) for n, x in grads.items()}
        norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
        g = {n: x * min(1.0, o.clip_norm / norm) for n, x in g.items()}
        t = k - 1
        lr_t = (s.peak_lr * t / s.warmup_steps if t < s.warmup_steps else s.peak_lr + (
            s.end_lr - s.peak_lr) * min(1.0, (t - s.warmup_steps) / s.decay_steps))
        for n in flat:
            m[n] = o.b1 * m[n] + (1 - o.b1) * g[n]
            v[n] = o.b2 * v[n] + (1 - o.b2) * g[n] ** 2
            u = m[n] / (np.sqrt(v[n]) + o.eps) * np.sqrt(1 - o.b2 ** k) / (1 - o.b1 ** k)
            hidden, vector = n in ("w_q", "w_down"), n in ("b_q", "scale")
            lr_g = lr_t * (scale if hidden else 1.0)
            wd_g = 0.0 if vector else o.weight_decay
            flat[n] = flat[n] - lr_g * (u + wd_g * flat[n])
    return flat


def test_llm360_adamw_step_matches_the_cerebras_formulas():
    """crystal's optimizer under crystalcoder's settings (rule cerebras, eps before bias
    correction, schedule index step) on a small tree of each group equals the update
    computed by hand; eps and decay are large here so a wrong placement or rule shows."""
    cfg = config.load("crystalcoder_tiny", {"optim.eps": 0.05, "optim.weight_decay": 0.5})
    assert (cfg.optim.rule, cfg.optim.eps_placement, cfg.optim.schedule_index) == (
        "cerebras", "before_correction", "step")
    rng = np.random.default_rng(0)
    shapes = {"embedding": (6, 4), "w_q": (4, 2, 2), "b_q": (2, 2), "w_down": (3, 4),
              "scale": (4,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads_seq = [{k: (rng.standard_normal(s) * 0.7).astype(np.float32)
                  for k, s in shapes.items()} for _ in range(4)]

    def tree(d):   # the names at the places crystal's param tree has them
        return {"embedding": d["embedding"], "final_norm": {"scale": d["scale"]},
                "layers": {"block": {"attn": {"w_q": d["w_q"], "b_q": d["b_q"]},
                                     "mlp": {"w_down": d["w_down"]}}}}

    def run(c):
        opt = optim.make_optimizer(c, 1)
        p = jax.tree.map(jnp.asarray, tree(params))
        st = opt.init(p)
        for g in grads_seq:
            u, st = jax.jit(opt.update)(jax.tree.map(jnp.asarray, tree(g)), st, p)
            p = optax.apply_updates(p, u)
        return p

    want = tree(_hand_cerebras_adamw(cfg, params, grads_seq))
    got = run(cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=2e-6,
                                                         atol=1e-7), got, want)
    # each LLM360 choice changes the result: the test sees a wrong one
    for field, other in (("optim.rule", "mup"), ("optim.eps_placement", "after_correction"),
                         ("optim.schedule_index", "update")):
        alt = run(config.load("crystalcoder_tiny", {"optim.eps": 0.05,
                                                    "optim.weight_decay": 0.5, field: other}))
        diff = max(float(np.abs(np.asarray(a) - b).max())
                   for a, b in zip(jax.tree.leaves(alt), jax.tree.leaves(want)))
        assert diff > 1e-4, field


def test_fixed_loss_denominator_is_rows_times_length():
    """train.loss_denominator='batch' divides the summed token losses by B x L whatever
    the mask (LLM360's loss_scaling=batch_size, loss_weight=1/msl); 'tokens' by the
    unmasked count. With half the targets masked the gradients differ by exactly 2x."""
    out = {}
    for denom in ("tokens", "batch"):
        cfg = _tiny(**{"data.seq_len": 16, "train.loss_denominator": denom})
        rng = np.random.default_rng(1)
        params = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.1).astype(
            np.float32), model.abstract_params(cfg))
        state = step_lib.TrainState(step=jnp.zeros([], jnp.int32), params=params,
                                    opt_state=optax.sgd(1.0).init(params),
                                    rng=jnp.zeros(2, jnp.uint32))
        toks = np.arange(2 * 17, dtype=np.int32).reshape(2, 17) % 500 + 3
        mask = np.ones((2, 16), np.float32)
        mask[:, 8:] = 0.0
        batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=mask)
        _, metrics = jax.jit(step_lib.make_train_step(cfg, optax.sgd(1.0)))(state, batch)
        assert float(metrics["tokens"]) == 16.0
        out[denom] = (float(metrics["loss"]), float(metrics["grad_norm"]))
    assert out["batch"][0] == pytest.approx(out["tokens"][0] / 2, rel=1e-6)
    assert out["batch"][1] == pytest.approx(out["tokens"][1] / 2, rel=1e-5)


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
