"""The pure training step: TrainState, init, the loss, and the train and eval steps.

Nothing here touches the host, files or devices: every function is pure, so the loop jits
it with its own shardings (crystal.sharding.shard_train_step), crystal.plan lowers it ahead
of time on fake devices, and the tests run the same code on one CPU.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from crystal import config as config_lib
from crystal import model as model_lib
from crystal import optim as optim_lib
from crystal.train import loss as loss_lib

# Batch fields the step reads (the loader yields more: shard, row, ... for bookkeeping).
STEP_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_id",
             "poison")


@flax.struct.dataclass
class TrainState:
    """Everything an exact resume needs on the device side (data state lives in the loader)."""
    step: jax.Array          # int32 optimizer steps taken (all stages; skipped steps count)
    params: Any              # float32 master params
    opt_state: Any           # optax state (Adam moments, stage schedule count)
    rng: jax.Array           # uint32 key data (jax.random.key_data), checkpointable

    def to_dict(self) -> dict:
        return dict(step=self.step, params=self.params, opt_state=self.opt_state, rng=self.rng)

    @classmethod
    def from_dict(cls, d) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])


def init_state(cfg, key, optimizer: optax.GradientTransformation, params=None) -> TrainState:
    """Fresh params from `cfg` (or the given ones: an imported model) and a fresh optimizer
    state, at step 0. Pure: jit/eval_shape it."""
    k_params, k_rng = jax.random.split(key)
    if params is None:
        params = model_lib.init(cfg, k_params)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.key_data(k_rng))


def abstract_state(cfg, optimizer) -> TrainState:
    return jax.eval_shape(lambda k: init_state(cfg, k, optimizer), jax.random.key(0))


def token_losses(params, batch, spec, capture: bool = False):
    """(per-token float32 cross-entropy B x L, float32 mask B x L, intermediates or None).

    The one loss of crystal: the train and eval steps sum it, the muP coordinate check
    averages it with `capture` (the model's sown mean |activation|s, and the output
    logits'). The output projection and the cross-entropy run in `model.loss_chunk`
    sequence chunks (crystal/train/loss.py): no B x L x V logits are ever materialised."""
    spec = model_lib.ModelSpec.from_config(spec)
    out = model_lib.hidden(params, batch["inputs"], spec, positions_BxL=batch.get("positions"),
                           segment_ids_BxL=batch.get("segment_ids"),
                           capture_intermediates=capture)
    hidden_BxLxD, inter = out if capture else (out, None)
    loss_BxL, abs_sum = loss_lib.cross_entropy(
        hidden_BxLxD, model_lib.output_head(params, spec), batch["targets"],
        multiplier=spec.logit_multiplier, dtype=spec.dtype, chunk=spec.loss_chunk,
        with_abs=capture)
    if capture:
        inter["output_logits"] = (abs_sum / (loss_BxL.size * spec.vocab_size),)
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    return loss_BxL * mask_BxL, mask_BxL, inter


def _source_onehot(batch, mask_BxL, num_sources):
    src = batch.get("source_id")
    if src is None:
        src = jnp.zeros(mask_BxL.shape[:1], jnp.int32)
    src = jnp.asarray(src, jnp.int32)
    if src.ndim == 1:
        src = jnp.broadcast_to(src[:, None], mask_BxL.shape)
    return jax.nn.one_hot(src, num_sources, dtype=jnp.float32)  # B x L x S


def loss_sums(params, batch, spec, num_sources: int = 1):
    """(sum of masked token losses, aux) where aux holds token counts and per-source sums.

    Sums, not means, so micro-batches add up to exactly the big batch's numbers.
    """
    loss_BxL, mask_BxL, _ = token_losses(params, batch, spec)
    oh_BxLxS = _source_onehot(batch, mask_BxL, num_sources)
    total = jnp.sum(loss_BxL)
    aux = dict(tokens=jnp.sum(mask_BxL), row_loss=jnp.sum(loss_BxL, axis=-1),
               source_loss=jnp.einsum("bl,bls->s", loss_BxL, oh_BxLxS),
               source_tokens=jnp.einsum("bl,bls->s", mask_BxL, oh_BxLxS))
    return total, aux


def _global_norm(tree):
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _step_inputs(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if k in STEP_KEYS}


def _accumulate(grad_fn, params, batch, accum: int, num_sources: int):
    """(summed grads, summed loss, aux, per-row losses B) over `accum` micro-batches.

    Micro-batch m is rows m, m + A, m + 2A, ...: every micro-batch spans all the batch
    shards, so accumulation moves no data between devices. At accum 1 there is no loop (a
    zero-filled accumulator would cost a pass over the params)."""
    if accum == 1:
        g_sum, aux = grad_fn(params, batch)
        row_loss_B = aux.pop("row_loss")
        return g_sum, jnp.sum(row_loss_B), aux, row_loss_B
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

    def micro_step(carry, mb):
        g_acc, loss_acc, aux_acc = carry
        g, aux = grad_fn(params, mb)
        row_loss = aux.pop("row_loss")
        return (jax.tree.map(jnp.add, g_acc, g), loss_acc + jnp.sum(row_loss),
                jax.tree.map(jnp.add, aux_acc, aux)), row_loss

    zeros_aux = dict(tokens=jnp.zeros([], jnp.float32),
                     source_loss=jnp.zeros([num_sources], jnp.float32),
                     source_tokens=jnp.zeros([num_sources], jnp.float32))
    (g_sum, loss_sum, aux), row_loss_AxR = jax.lax.scan(
        micro_step, (jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.float32),
                     zeros_aux), micro)
    return g_sum, loss_sum, aux, jnp.swapaxes(row_loss_AxR, 0, 1).reshape(-1)


def loss_denominator(cfg):
    """`(batch, unmasked tokens) -> n`, what the summed token losses (and their gradients)
    are divided by (train.loss_denominator): the batch's unmasked tokens ('tokens'), or
    LLM360's fixed rows x seq_len ('batch': Cerebras `loss_scaling: batch_size` with
    `loss_weight: 1/msl`), the same for every batch whatever its FIM padding."""
    if cfg.train.loss_denominator == "batch":
        return lambda batch, tokens: jnp.asarray(batch["loss_mask"].size, jnp.float32)
    return lambda batch, tokens: jnp.maximum(tokens, 1.0)


def make_train_step(cfg, optimizer: optax.GradientTransformation, num_sources: int = 1):
    """A pure `step(state, batch) -> (state, metrics)`.

    The batch (global_batch_size rows) is split into `train.grad_accum` micro-batches
    whose token-loss gradients are summed; dividing by the batch's denominator
    (`loss_denominator`) gives the same update as the one large batch. A non-finite loss
    or gradient norm leaves params and optimizer state unchanged (`metrics['skipped'] = 1`);
    the step counter still advances, since the data did.

    `batch['poison']` (per-row floats added to loss and gradients; NaN injects a fault) is
    how `train.fault_nan_shards` and the tests make a data shard's steps go bad.
    """
    spec = model_lib.ModelSpec.from_config(cfg)
    accum = int(cfg.train.grad_accum)
    grad_fn = jax.grad(lambda p, b: loss_sums(p, b, spec, num_sources), has_aux=True)
    denominator = loss_denominator(cfg)

    def step(state: TrainState, batch):
        batch = _step_inputs(batch)
        poison = batch.pop("poison", None)
        g_sum, loss_sum, aux, row_loss_B = _accumulate(grad_fn, state.params, batch, accum,
                                                        num_sources)
        if poison is not None:
            poison_B = poison.astype(jnp.float32)
            row_loss_B = row_loss_B + poison_B
            loss_sum = loss_sum + jnp.sum(poison_B)
            g_sum = jax.tree.map(lambda g: g + jnp.sum(poison_B), g_sum)
        n = denominator(batch, aux["tokens"])
        grads = jax.tree.map(lambda g: g / n, g_sum)
        loss = loss_sum / n
        grad_norm = _global_norm(grads)

        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        metrics = dict(
            loss=loss,
            source_loss=aux["source_loss"] / jnp.maximum(aux["source_tokens"], 1.0),
            source_tokens=aux["source_tokens"],
            tokens=aux["tokens"],
            grad_norm=grad_norm,
            update_norm=jnp.where(ok, _global_norm(updates), 0.0),
            param_norm=_global_norm(state.params),
            schedule_step=optim_lib.schedule_count(state.opt_state),
            lr=optim_lib.current_lr(state.opt_state, cfg.optim.schedule_index),
            skipped=(~ok).astype(jnp.int32),
            row_finite=jnp.isfinite(row_loss_B),   # which rows' data made a step go bad
        )
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=keep(new_opt, state.opt_state), rng=state.rng)
        return new_state, metrics

    return step


def make_eval_step(cfg, num_sources: int = 1):
    """`eval_step(params, batch) -> (loss_sum, tokens)`: pure, for the validation sets."""
    spec = model_lib.ModelSpec.from_config(cfg)

    def eval_step(params, batch):
        total, aux = loss_sums(params, _step_inputs(batch), spec, num_sources)
        return total, aux["tokens"]
    return eval_step


def enter_stage(cfg, n: int, state: TrainState, fresh) -> TrainState:
    """The stage boundary as LLM360 ran it: params kept (re-initialised for init='scratch'),
    the Adam state reset (stages.stage_N.reset_optimizer) or kept, the stage's schedule
    restarted at 0. `fresh()` gives a freshly initialised state (the loop's sharded init;
    a release replay's single-device one); the step counter always continues."""
    s = config_lib.stage(cfg, n)
    if s.init == "scratch":
        new = fresh()
        return new.replace(step=state.step,
                           opt_state=optim_lib.restart_schedule(new.opt_state, s))
    opt_state = fresh().opt_state if s.reset_optimizer else state.opt_state
    return state.replace(opt_state=optim_lib.restart_schedule(opt_state, s))
