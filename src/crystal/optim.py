"""LLM360's optimizer: AdamW with muP learning-rate groups, decay masks, clipping, schedules.

One Adam state for every parameter; the per-class muP multipliers (mup/rules.py) are
per-leaf constants, so an update is

    u = -lr_base(t) * lr_mult[c] * (adam(clip(g)) + wd * wd_mult[c] * mask[c] * p)

`optim.rule` picks wd_mult: 'mup' has `lr_mult[c] * wd_mult[c] = 1` (a class whose LR is
scaled by the width scale keeps the same effective decay `lr * wd`, microsoft/mup's MuAdamW);
'cerebras' has wd_mult = 1 (the decay LLM360's Cerebras AdamW applied, coupled to each
group's LR). `optim.eps_placement` picks Adam's eps: optax's (after bias correction) or
Cerebras' (before it). `optim.schedule_index` picks where warmup starts (see `schedule`).

The schedule counts the updates *applied within the current stage* (its own state, the last
element of the chain): a step skipped for a NaN does not advance it (as optax's
apply_if_finite), and a new stage that keeps the Adam moments restarts only this count
(`restart_schedule`), never Adam's bias-correction count.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from crystal import config as config_lib
from crystal import mup as mup_lib


# ----------------------------------------------------------------------------- schedules


def schedule_params(stage_cfg) -> dict:
    """The numbers a stage's schedule is made of (float32 arrays: they live in the
    optimizer state, so one compiled train step serves every stage)."""
    sc = stage_cfg.schedule
    warm = int(sc.warmup_steps)
    decay = int(sc.decay_steps) or max(int(stage_cfg.steps) - warm, 1)
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return dict(warmup=f(warm), decay=f(decay), peak=f(sc.peak_lr), end=f(sc.end_lr),
                cosine=f(sc.kind == "cosine"))


def schedule_value(t, p: dict, index: str = "update"):
    """Base LR at stage step t for schedule params `p` (see `schedule`)."""
    t = jnp.asarray(t, jnp.float32)
    first = 1.0 if index == "update" else 0.0
    warm_lr = p["peak"] * (t + first) / jnp.maximum(p["warmup"], 1.0)
    frac = jnp.clip((t - p["warmup"]) / p["decay"], 0.0, 1.0)
    lin = p["peak"] + (p["end"] - p["peak"]) * frac
    cos = p["end"] + 0.5 * (p["peak"] - p["end"]) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(t < p["warmup"], warm_lr, jnp.where(p["cosine"] > 0, cos, lin))


def schedule(stage_cfg, index: str = "update") -> optax.Schedule:
    """Base LR at step t of a stage (t from 0): linear warmup to peak, then decay.

    Warmup (`optim.schedule_index`): 'update' gives peak x (t + 1) / warmup_steps, so the
    first update is not wasted at LR 0 and step warmup_steps - 1 is at peak; 'step' gives
    peak x t / warmup_steps, Cerebras' LR list indexed by the step before the update (the
    first update has LR 0). Either way the decay line starts at peak at t = warmup_steps.
    'linear' (CrystalCoder): a straight line from peak_lr aimed at end_lr over decay_steps
    post-warmup steps (0: the rest of the stage). The stage may stop part-way down the line
    (stage 1 stops at 27%); past the line's end the LR stays at end_lr.
    'cosine' (Amber): half-cosine from peak_lr to end_lr over decay_steps, then end_lr.
    """
    p = schedule_params(stage_cfg)
    return lambda t: schedule_value(t, p, index)


# ----------------------------------------------------------------------------- groups


def param_classes(params):
    """A pytree like params whose leaves are muP class names (mup.param_class)."""
    def cls(path, _):
        return mup_lib.param_class(tuple(getattr(k, "key", getattr(k, "name", str(k)))
                                         for k in path))
    return jax.tree_util.tree_map_with_path(cls, params)


def lr_multipliers(cfg, params):
    r = mup_lib.rules(cfg)
    return jax.tree.map(lambda c: float(r.lr_mult[c]), param_classes(params))


def wd_coefficients(cfg, params):
    """Per-leaf decoupled weight decay: wd x wd_mult[class] (optim.rule), 0 where the mask
    excludes it."""
    r, o = mup_lib.rules(cfg), cfg.optim

    def coef(c):
        if o.wd_mask == "matrices" and c == "vector":
            return 0.0
        return float(o.weight_decay) * float(r.wd_mult[c])
    return jax.tree.map(coef, param_classes(params))


def group_lrs(cfg, base_lr) -> dict:
    """The LR each muP class actually gets, plus the unscaled base LR ('base')."""
    r = mup_lib.rules(cfg)
    out = {"base": base_lr}
    out.update({c: base_lr * r.lr_mult[c] for c in mup_lib.CLASSES})
    return out


# ----------------------------------------------------------------------------- transforms


class ScheduleState(NamedTuple):
    count: jax.Array  # updates applied in this stage
    params: dict      # schedule_params of the stage


def _tree_like(fn_or_tree, params):
    return fn_or_tree(params) if callable(fn_or_tree) else fn_or_tree


def add_decayed_weights_per_leaf(coefs) -> optax.GradientTransformation:
    """u + coef * p, with a per-leaf coefficient tree (or a function of params giving it)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        c = _tree_like(coefs, params)
        updates = jax.tree.map(lambda u, p, k: u + k * p.astype(u.dtype) if k else u,
                               updates, params, c)
        return updates, state
    return optax.GradientTransformation(init, update)


def scale_by_adam_eps_before_correction(b1: float, b2: float, eps: float
                                        ) -> optax.GradientTransformation:
    """Cerebras Model Zoo 1.9.1's AdamW step (AdamBase with correct_bias), as LLM360 ran it:
    u = m / (sqrt(v) + eps) x sqrt(1 - b2^k) / (1 - b1^k). optax adds eps to sqrt(v^) after
    bias correction; here it is added to sqrt(v) before, which is eps x sqrt(1 - b2^k)
    larger in optax's terms (a 3x larger eps at k = 10, the same one late in training).
    The state is optax's ScaleByAdamState, so checkpoints hold the same tree either way."""
    def init(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=optax.tree.zeros_like(params),
                                      nu=optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        k = count.astype(jnp.float32)
        correction = jnp.sqrt(1.0 - b2 ** k) / (1.0 - b1 ** k)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps) * correction, mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
    return optax.GradientTransformation(init, update)


def scale_by_stage_schedule(stage_cfg, mults, index: str = "update"
                            ) -> optax.GradientTransformation:
    """u * -lr(count) * mult, per leaf; `count` and the schedule's numbers are state."""
    def init(params):
        del params
        return ScheduleState(count=jnp.zeros([], jnp.int32),
                             params=schedule_params(stage_cfg))

    def update(updates, state, params=None):
        m = _tree_like(mults, updates)
        lr = schedule_value(state.count, state.params, index)
        updates = jax.tree.map(lambda u, k: (-lr * k * u).astype(u.dtype), updates, m)
        return updates, state._replace(count=optax.safe_increment(state.count))
    return optax.GradientTransformation(init, update)


def make_optimizer(cfg, stage: int) -> optax.GradientTransformation:
    """AdamW of `cfg.optim` with the schedule of stage `stage` (1-based) and muP groups.

    The chain's state structure and its update function are the same for every stage
    (the stage's schedule numbers are state), so Adam moments carry over and one compiled
    train step serves all stages.
    """
    o = cfg.optim
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(o.clip_norm)))
    else:
        parts.append(optax.identity())
    adam = (optax.scale_by_adam if o.eps_placement == "after_correction"
            else scale_by_adam_eps_before_correction)
    parts += [
        adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)),
        add_decayed_weights_per_leaf(lambda p: wd_coefficients(cfg, p)),
        scale_by_stage_schedule(config_lib.stage(cfg, stage),
                                lambda u: lr_multipliers(cfg, u), o.schedule_index),
    ]
    return optax.chain(*parts)


def restart_schedule(opt_state, stage_cfg, count: int = 0):
    """The same optimizer state on `stage_cfg`'s schedule at step `count` (a new stage:
    0; Adam's moments and bias-correction count are untouched)."""
    *rest, last = opt_state
    assert isinstance(last, ScheduleState), type(last)
    return tuple(rest) + (ScheduleState(count=jnp.full_like(last.count, count),
                                        params=schedule_params(stage_cfg)),)


def _schedule_state(opt_state):
    last = opt_state[-1] if isinstance(opt_state, tuple) and opt_state else None
    return last if isinstance(last, ScheduleState) else None


def schedule_count(opt_state):
    """Updates applied in this stage (0 for an optimizer not made by make_optimizer)."""
    st = _schedule_state(opt_state)
    return st.count if st is not None else jnp.zeros([], jnp.int32)


def current_lr(opt_state, index: str = "update"):
    """The base LR the next update will use (0 for a foreign optimizer); `index` is the
    optimizer's optim.schedule_index."""
    st = _schedule_state(opt_state)
    return schedule_value(st.count, st.params, index) if st is not None else jnp.zeros([])
