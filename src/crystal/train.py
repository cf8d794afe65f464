"""Training: `python -m crystal.train`, the whole loop top to bottom (nanodo style).

Pure pieces first (TrainState, init_state, loss_fn, make_train_step: jit them with your own
shardings), then the loop that runs the stages, checkpoints, metrics and stability policy.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from crystal import model as model_lib
from crystal import optim as optim_lib

# Batch fields the step reads (the loader yields more: chunk, row, ... for bookkeeping).
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


def init_state(cfg, key, optimizer: optax.GradientTransformation) -> TrainState:
    """Fresh params from `cfg` and a fresh optimizer state. Pure: jit/eval_shape it."""
    k_params, k_rng = jax.random.split(key)
    params = model_lib.init(cfg, k_params)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.key_data(k_rng))


def abstract_state(cfg, optimizer) -> TrainState:
    return jax.eval_shape(lambda k: init_state(cfg, k, optimizer), jax.random.key(0))


def _token_losses(params, batch, cfg):
    """Per-token float32 cross-entropy (B x L) and the float32 mask."""
    logits_BxLxV = model_lib.apply(params, batch["inputs"], cfg,
                                   positions_BxL=batch.get("positions"),
                                   segment_ids_BxL=batch.get("segment_ids"))
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    tgt_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None].astype(jnp.int32),
                                  axis=-1)[..., 0]
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    return (logz_BxL - tgt_BxL) * mask_BxL, mask_BxL


def _source_onehot(batch, mask_BxL, num_sources):
    src = batch.get("source_id")
    if src is None:
        src = jnp.zeros(mask_BxL.shape[:1], jnp.int32)
    src = jnp.asarray(src, jnp.int32)
    if src.ndim == 1:
        src = jnp.broadcast_to(src[:, None], mask_BxL.shape)
    return jax.nn.one_hot(src, num_sources, dtype=jnp.float32)  # B x L x S


def loss_sums(params, batch, cfg, num_sources: int = 1):
    """(sum of masked token losses, aux) where aux holds token counts and per-source sums.

    Sums, not means, so micro-batches add up to exactly the big batch's numbers.
    """
    loss_BxL, mask_BxL = _token_losses(params, batch, cfg)
    oh_BxLxS = _source_onehot(batch, mask_BxL, num_sources)
    total = jnp.sum(loss_BxL)
    aux = dict(tokens=jnp.sum(mask_BxL), row_loss=jnp.sum(loss_BxL, axis=-1),
               source_loss=jnp.einsum("bl,bls->s", loss_BxL, oh_BxLxS),
               source_tokens=jnp.einsum("bl,bls->s", mask_BxL, oh_BxLxS))
    return total, aux


def loss_fn(params, batch, cfg, num_sources: int = 1):
    """Masked mean cross-entropy (float32) and per-source mean losses (S,)."""
    total, aux = loss_sums(params, batch, cfg, num_sources)
    loss = total / jnp.maximum(aux["tokens"], 1.0)
    per_source = aux["source_loss"] / jnp.maximum(aux["source_tokens"], 1.0)
    return loss, per_source


def _global_norm(tree):
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def make_train_step(cfg, optimizer: optax.GradientTransformation, num_sources: int = 1):
    """A pure `step(state, batch) -> (state, metrics)`.

    The batch (global_batch_size rows) is split into `train.grad_accum` micro-batches that a
    lax.scan runs one after another, summing token-loss gradients; dividing by the total
    token count gives the same update as the one large batch. A non-finite loss or gradient
    norm leaves params and optimizer state unchanged (`metrics['skipped'] = 1`); the step
    counter still advances, since the data did.

    `batch['poison']` (per-row floats added to loss and gradients; NaN injects a fault) is
    how `train.fault_nan_chunks` and the tests make a data chunk's steps go bad.
    """
    accum = int(cfg.train.grad_accum)

    def step(state: TrainState, batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in STEP_KEYS}
        poison = batch.pop("poison", None)
        # Micro-batch m is rows m, m + A, m + 2A, ...: every micro-batch spans all the
        # batch shards, so accumulation moves no data between devices.
        micro = jax.tree.map(lambda x: jnp.swapaxes(
            x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)
        grad_fn = jax.grad(loss_sums, has_aux=True)

        def micro_step(carry, mb):
            g_acc, loss_acc, aux_acc = carry
            g, aux = grad_fn(state.params, mb, cfg, num_sources)
            row_loss = aux.pop("row_loss")
            loss_acc = loss_acc + jnp.sum(row_loss)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
            return (g_acc, loss_acc, aux_acc), row_loss

        if accum == 1:   # no loop: a zero-filled accumulator costs a pass over the params
            g_sum, aux = grad_fn(state.params, batch, cfg, num_sources)
            row_loss_B = aux.pop("row_loss")
            loss_sum = jnp.sum(row_loss_B)
        else:
            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            zeros_aux = dict(tokens=jnp.zeros([], jnp.float32),
                             source_loss=jnp.zeros([num_sources], jnp.float32),
                             source_tokens=jnp.zeros([num_sources], jnp.float32))
            (g_sum, loss_sum, aux), row_loss_AxR = jax.lax.scan(
                micro_step, (zeros_g, jnp.zeros([], jnp.float32), zeros_aux), micro)
            row_loss_B = jnp.swapaxes(row_loss_AxR, 0, 1).reshape(-1)   # back to row order
        if poison is not None:
            poison_B = poison.astype(jnp.float32)
            row_loss_B = row_loss_B + poison_B
            loss_sum = loss_sum + jnp.sum(poison_B)
            g_sum = jax.tree.map(lambda g: g + jnp.sum(poison_B), g_sum)
        n = jnp.maximum(aux["tokens"], 1.0)
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
            lr=optim_lib.current_lr(state.opt_state),
            skipped=(~ok).astype(jnp.int32),
            row_finite=jnp.isfinite(row_loss_B),   # which rows' data made a step go bad
        )
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=keep(new_opt, state.opt_state), rng=state.rng)
        return new_state, metrics

    return step


def make_eval_step(cfg, num_sources: int = 1):
    """`eval_step(params, batch) -> (loss_sum, tokens)`: pure, for the validation sets."""
    def eval_step(params, batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in STEP_KEYS}
        total, aux = loss_sums(params, batch, cfg, num_sources)
        return total, aux["tokens"]
    return eval_step


# ============================================================================= the loop
#
# Everything below is host-side policy: which checkpoint to start from, when to save, what
# to log, what to do about bad steps and signals. One function, `run`, reads top to bottom.

import collections  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from crystal import checkpoint as ckpt_lib  # noqa: E402
from crystal import cli  # noqa: E402
from crystal import fileio  # noqa: E402
from crystal import config as config_lib  # noqa: E402
from crystal import metrics as metrics_lib  # noqa: E402
from crystal import sharding as sharding_lib  # noqa: E402
from crystal.errors import TrainError  # noqa: E402

log = logging.getLogger("crystal.train")

RUN_FILE = "run.json"
QUARANTINE_FILE = "quarantine.json"




def check_workdir(cfg, workdir: Path, claim: bool = True) -> dict | None:
    """Refuses a workdir holding another config's run; with `claim`, records this one.

    The identity is config.fingerprint (model, tokenizer, data, stages, seed): train.*,
    checkpoint.* and metrics.* may change between restarts, the run's definition may not.
    """
    path = workdir / RUN_FILE
    fp = config_lib.fingerprint(cfg)
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
        if have.get("fingerprint") != fp:
            raise TrainError(
                f"{workdir} holds a run of another config ({have.get('config_name')!r}, "
                f"fingerprint {have.get('fingerprint')}; this config {cfg.name!r} has {fp}); "
                "use another --workdir")
        return have
    if not claim:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    rec = dict(fingerprint=fp, config_name=cfg.name, created=time.time(),
               config=config_lib.to_json_dict(cfg))
    fileio.write_json(path, rec, sort_keys=True)
    return rec


def _chunk_names(batch, group_names) -> list[str]:
    """'group:index' of each row's data chunk (the loader's provenance fields)."""
    g, c = np.asarray(batch["group"]).reshape(-1), np.asarray(batch["chunk"]).reshape(-1)
    return [f"{group_names[int(a)]}:{int(b)}" for a, b in zip(g, c)]


def _poison(names: list[str], patterns: str) -> np.ndarray:
    """Per-row NaN for rows of `train.fault_nan_chunks` (fnmatch on 'group:index'), else 0."""
    import fnmatch
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return np.asarray([np.nan if any(fnmatch.fnmatchcase(n, p) for p in pats) else 0.0
                       for n in names], np.float32)


class Progress:
    """A tqdm bar on a terminal (step, stage, loss, tokens/s, ETA), plain log lines not."""

    def __init__(self, cfg, total: int, initial: int):
        self.tty = bool(cfg.train.progress) and sys.stderr.isatty()
        self.total, self.done, self.t0 = total, initial, time.time()
        self.start = initial
        self.every = max(1, total // 20)
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, step: int, stage: int, loss: float, tok_s: float):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"step {step} stage {stage} loss {loss:.4f} "
                                     f"{tok_s:,.0f} tok/s")
            return
        if self.done % self.every and self.done != self.total:
            return
        rate = (self.done - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        print(f"step {step} ({self.done}/{self.total}) stage {stage} loss {loss:.4f} "
              f"{tok_s:,.0f} tok/s eta {eta:,.0f}s", flush=True)

    def write(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _Signals:
    """SIGTERM / SIGINT set a flag; the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        if threading_main():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _SpikeDetector:
    """Rolling z-score of the loss over the last `window` finite steps."""

    def __init__(self, window: int, z: float):
        self.hist = collections.deque(maxlen=max(int(window), 2))
        self.z = float(z)

    def __call__(self, loss: float) -> float:
        score = 0.0
        if len(self.hist) >= min(10, self.hist.maxlen):
            mu, sd = float(np.mean(self.hist)), float(np.std(self.hist))
            score = (loss - mu) / max(sd, 1e-6)
        if math.isfinite(loss):
            self.hist.append(loss)
        return score


class _Run:
    """The state of one `run` call that the helpers below share (host side only)."""

    def __init__(self, cfg, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.names = config_lib.stage_names(cfg)
        self.ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir),
                                          keep_recent=int(cfg.checkpoint.keep_recent),
                                          async_save=bool(cfg.checkpoint.async_save))
        n = math.prod(int(cfg.mesh[a]) for a in sharding_lib.MESH_AXES)
        devices = jax.devices() if cfg.mesh.preset else jax.devices()[:n]
        self.mesh = sharding_lib.make_mesh(cfg, devices)
        self.num_devices = len(devices)
        self.device_kind = devices[0].device_kind
        self.tokens_seen = 0
        self.skipped_total = 0


def _meta(r: _Run, stage: int, stage_step: int, loader, done: bool = False, **extra) -> dict:
    m = dict(config=config_lib.to_json_dict(r.cfg), fingerprint=config_lib.fingerprint(r.cfg),
             data_sha256=r.data_sha256, stage=stage, stage_step=stage_step,
             stage_done=done, chunk=loader.chunk_of_step(min(stage_step, loader.steps - 1)),
             tokens_seen=int(r.tokens_seen), skipped_steps=int(r.skipped_total))
    m.update(extra)
    return m


def _save(r: _Run, state: TrainState, stage: int, loader, release=False, force=False,
          done=False, **extra) -> bool:
    meta = _meta(r, stage, loader.step, loader, done=done, **extra)
    return r.ckpt.save(int(state.step), state.to_dict(), loader.get_state(), meta,
                       release=release, force=force)


def _restore(r: _Run, ckpt: ckpt_lib.Checkpointer, step: int, abstract: TrainState,
             shardings, what: str):
    target = sharding_lib.abstract_with_shardings(abstract.to_dict(), shardings.to_dict())
    try:
        st, data, meta = ckpt.restore(step, target)
    except (ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{ckpt.directory}/{step}: cannot restore into this config's train "
                         f"state ({what}): {str(e).splitlines()[0][:300]}") from None
    return TrainState.from_dict(st), data, meta


def plan_start(r: _Run, stage_flag: int, init_from: str | None) -> dict:
    """Where this invocation starts: resume, a stage boundary, init_from, or scratch.

    Returns {'kind': 'resume'|'after'|'init_from'|'scratch'|'complete', 'stage', 'step'}.
    """
    cfg, ckpt, wd = r.cfg, r.ckpt, r.workdir
    last = len(r.names)
    latest = ckpt.latest_step()
    cmd = (f"python -m crystal.train --config=<this config> --workdir={wd}")
    if latest is not None:
        m = ckpt.read_meta(latest)
        s, done = int(m["stage"]), bool(m.get("stage_done"))
        if stage_flag == 0 or stage_flag == s and not done:
            if done:
                if s == last:
                    return dict(kind="complete", stage=s, step=latest)
                return dict(kind="after", stage=s + 1, step=latest)
            return dict(kind="resume", stage=s, step=latest)
        if stage_flag == s + 1 and done:
            return dict(kind="after", stage=stage_flag, step=latest)
        if stage_flag == s and done:
            return dict(kind="complete", stage=s, step=latest)
        raise TrainError(
            f"--stage={stage_flag}: {ckpt.directory} already holds stage {s} "
            f"{'(finished)' if done else '(in progress)'} at step {latest}; stage "
            f"{stage_flag} starts from stage {stage_flag - 1}'s final checkpoint. Re-run a "
            "stage in a new workdir with --init_from=" f"{ckpt.directory}/<step>")
    start = stage_flag or 1
    if init_from:
        return dict(kind="init_from", stage=start, path=init_from)
    if start == 1 or config_lib.stage(cfg, start).init == "scratch":
        return dict(kind="scratch", stage=start)
    raise TrainError(
        f"--stage={start} starts from stage {start - 1}'s final checkpoint, but "
        f"{ckpt.directory} has none; make it with `{cmd} --stage={start - 1}` "
        f"(or pass --init_from=PATH)")


def _enter_stage(r: _Run, stage: int, state: TrainState, fresh_init) -> TrainState:
    """Stage boundary: params kept (or re-initialised for init='scratch'); the optimizer
    state reset (stage.reset_optimizer) or kept with the stage schedule restarted."""
    s = config_lib.stage(r.cfg, stage)
    if s.init == "scratch":
        new = fresh_init()
        return new.replace(step=state.step,
                           opt_state=optim_lib.restart_schedule(new.opt_state, s))
    opt_state = fresh_init().opt_state if s.reset_optimizer else state.opt_state
    return state.replace(opt_state=optim_lib.restart_schedule(opt_state, s))


def _quarantine(r: _Run, rec: dict):
    path = r.workdir / QUARANTINE_FILE
    have = json.loads(path.read_text()) if path.exists() else {"incidents": []}
    have["incidents"].append(rec)
    have["chunks"] = sorted({i["chunk"] for i in have["incidents"]})
    fileio.write_json(path, have, sort_keys=True)


def _evaluate(r: _Run, eval_step, params, loader, bsh) -> dict:
    """Mean validation loss per data group of the stage, and over all its groups."""
    n = int(r.cfg.train.eval_batches)
    if n <= 0:
        return {}
    out, tot, cnt = {}, 0.0, 0.0
    for g, batches in loader.val_batches(n).items():
        s = c = 0.0
        for b in batches:
            gb = sharding_lib.global_batch({k: v for k, v in b.items() if k in STEP_KEYS}, bsh,
                                           r.cfg.train.global_batch_size)
            ls, tk = eval_step(params, gb)
            s, c = s + float(ls), c + float(tk)
        out[f"eval/{g}/loss"] = s / max(c, 1.0)
        tot, cnt = tot + s, cnt + c
    if cnt:
        out["eval/loss"] = tot / cnt
    return out


def enable_compilation_cache(cfg):
    """JAX's persistent compilation cache (train.compilation_cache): a re-run, a resume or
    the next stage's process skips XLA compilation (tens of seconds on small CPUs)."""
    where = cfg.train.get("compilation_cache", "")
    if not where or jax.config.jax_compilation_cache_dir:
        return
    if where == "auto":
        where = str(fileio.cache_root(cfg) / "jax_compilation")
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(cfg, workdir, stage: int | None = None, init_from: str | None = None,
        stop_after_steps: int | None = None) -> dict:
    """Trains `cfg` in `workdir` from wherever it stands; returns a summary dict.

    stage: None -> cfg.train.stage (0: all stages in order from the last checkpoint; N:
    stage N onwards, starting from stage N-1's final checkpoint). init_from: a checkpoint
    (workdir, checkpoints dir or step dir) to take params (and optimizer state, unless the
    stage resets it) from when this workdir has none. stop_after_steps: stop (with a
    checkpoint, as on SIGTERM) after this many steps of this invocation (tests, benches).
    """
    from crystal.data import loader as loader_lib
    from crystal.data import prepare as prepare_lib

    cfg = config_lib.validate(cfg)
    workdir = Path(workdir)
    stage_flag = int(cfg.train.stage if stage is None else stage)
    if not 0 <= stage_flag <= len(cfg.stages):
        raise TrainError(f"--stage={stage_flag}: config has stages 1..{len(cfg.stages)}")
    check_workdir(cfg, workdir, claim=False)
    enable_compilation_cache(cfg)
    manifest = prepare_lib.ensure_prepared(cfg, workdir)
    check_workdir(cfg, workdir)      # claimed once its data exists
    _, data_sha = loader_lib.read_manifest(workdir)
    group_names = sorted(manifest["groups"])
    num_sources = len(group_names)

    r = _Run(cfg, workdir)
    r.data_sha256 = data_sha
    B = int(cfg.train.global_batch_size)
    plan = plan_start(r, stage_flag, init_from)
    summary = dict(workdir=str(workdir), checkpoints=str(r.ckpt.directory),
                   metrics=str(workdir / "metrics.jsonl"), plot=str(workdir / "loss.png"),
                   start=plan, preempted=None, rollbacks=0, steps_run=0)
    if plan["kind"] == "complete":
        summary["final_step"] = plan["step"]
        r.ckpt.close()
        return summary

    # Shardings. The optimizer's structure is stage-independent (optim.make_optimizer), so
    # one abstract state and one set of shardings serve every stage.
    opt1 = optim_lib.make_optimizer(cfg, 1)
    abstract = abstract_state(cfg, opt1)
    shardings = sharding_lib.state_shardings(abstract, cfg, r.mesh)
    bsh = sharding_lib.batch_sharding(cfg, r.mesh)
    pidx, pcount = sharding_lib.data_slice(bsh, B)
    init_key = jax.random.key(int(cfg.seed))

    def fresh_init() -> TrainState:
        with sharding_lib.mesh_context(cfg, r.mesh):
            return jax.jit(lambda k: init_state(cfg, k, opt1), out_shardings=shardings)(init_key)

    def new_loader(n):
        return loader_lib.StageLoader(cfg, workdir, n, pidx, pcount)

    # Where we start.
    stage_n = plan["stage"]
    loader = new_loader(stage_n)
    save_at_start = False
    if plan["kind"] == "resume":
        state, data_state, meta = _restore(r, r.ckpt, plan["step"], abstract, shardings,
                                           "resume")
        loader.set_state(data_state)
    elif plan["kind"] == "after":
        state, _, meta = _restore(r, r.ckpt, plan["step"], abstract, shardings, "stage start")
        state = _enter_stage(r, stage_n, state, fresh_init)
    elif plan["kind"] == "init_from":
        src, step = ckpt_lib.open_checkpoint(plan["path"])
        state, _, meta = _restore(r, src, step, abstract, shardings, "--init_from")
        state = _enter_stage(r, stage_n, state, fresh_init) if config_lib.stage(
            cfg, stage_n).init != "scratch" else state
        summary["init_from"] = f"{src.directory}/{step}"
        save_at_start = True
    else:
        state, meta = fresh_init(), {}
        save_at_start = True
    r.tokens_seen = int(meta.get("tokens_seen", 0))
    r.skipped_total = int(meta.get("skipped_steps", 0))

    writer = metrics_lib.create_writer(cfg, workdir, jax.process_index(),
                                       resume_step=int(state.step) + 1)
    if plan["kind"] in ("scratch", "init_from") and int(state.step) == 0:
        writer.write_hparams(dict(_flat(config_lib.to_json_dict(cfg))))
    total = sum(config_lib.stage(cfg, n).steps for n in range(stage_n, len(r.names) + 1))
    progress = Progress(cfg, total, loader.step)
    progress.write(f"crystal.train: {cfg.name} in {workdir} ({plan['kind']} at stage "
                   f"{stage_n}, step {int(state.step)}; {r.num_devices} x {r.device_kind})")
    flops_tok = metrics_lib.flops_per_token(cfg)
    peak = metrics_lib.peak_flops_per_device(r.device_kind,
                                             cfg.metrics.get("peak_flops_per_device", 0.0))

    def log_plot():
        if cfg.metrics.plot and jax.process_index() == 0:
            writer.flush()
            try:
                metrics_lib.plot_loss(workdir / "metrics.jsonl", workdir / "loss.png")
            except metrics_lib.MetricsError as e:
                log.warning("loss plot: %s", e)

    # One compiled step for every stage: the stage's schedule is optimizer state.
    step_fn = sharding_lib.shard_train_step(make_train_step(cfg, opt1, num_sources), cfg,
                                            r.mesh, shardings)
    eval_fn = jax.jit(make_eval_step(cfg, num_sources))
    steps_run = 0
    with _Signals() as sig:
        while True:
            # ------------------------------------------------------------- one stage
            if save_at_start:
                _save(r, state, stage_n, loader)
                save_at_start = False
            bad = collections.deque()      # (stage step, chunk names) of non-finite steps
            spikes = _SpikeDetector(cfg.train.spike_window, cfg.train.spike_zscore)
            t_last = time.perf_counter()
            while loader.step < loader.steps:
                # data
                t0 = time.perf_counter()
                batch = next(loader)
                s_before = loader.step - 1
                names = _chunk_names(batch, group_names)
                # Always present (zeros unless faults are injected): one compiled step.
                batch["poison"] = _poison(names, cfg.train.fault_nan_chunks)
                dev = sharding_lib.global_batch({k: v for k, v in batch.items()
                                                 if k in STEP_KEYS}, bsh, B)
                t_data = time.perf_counter() - t0
                # step
                state, m = step_fn(state, dev)
                m = jax.device_get(m)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                steps_run += 1
                skipped = int(m["skipped"])
                tokens = int(m["tokens"])
                r.tokens_seen += tokens
                r.skipped_total += skipped
                loss = float(m["loss"])
                tok_s = B * cfg.data.seq_len / max(dt, 1e-9)
                z = spikes(loss) if not skipped else 0.0
                chunk = loader.chunk_of_step(s_before)
                base_lr = float(m["lr"])
                rec = dict(stage=stage_n, chunk=chunk, stage_step=s_before + 1, loss=loss,
                           grad_norm=float(m["grad_norm"]), param_norm=float(m["param_norm"]),
                           update_norm=float(m["update_norm"]), tokens=tokens,
                           tokens_seen=r.tokens_seen, tokens_per_s=tok_s,
                           mfu=tok_s * flops_tok / (r.num_devices * peak),
                           step_time=dt, data_wait=t_data, skipped=skipped,
                           skipped_steps=r.skipped_total, loss_zscore=z,
                           spike=int(z > cfg.train.spike_zscore))
                for k, v in optim_lib.group_lrs(cfg, base_lr).items():
                    rec["lr" if k == "base" else f"lr/{k}"] = v
                for i, g in enumerate(group_names):
                    if m["source_tokens"][i] > 0:
                        rec[f"loss/{g}"] = float(m["source_loss"][i])
                for k, v in metrics_lib.device_memory().items():
                    rec[f"memory/{k}"] = v
                if int(state.step) % max(int(cfg.train.log_every), 1) == 0 or skipped:
                    writer.write_scalars(int(state.step), rec)
                if rec["spike"]:
                    progress.write(f"warning: loss spike at step {int(state.step)}: "
                                   f"{loss:.4f} (z={z:.1f})")
                progress.update(int(state.step), stage_n, loss, tok_s)

                # stability: K non-finite steps in a window -> roll back, quarantine a chunk
                if skipped:
                    progress.write(f"warning: non-finite loss/grad at step {int(state.step)} "
                                   f"(stage {stage_n} step {s_before}); update skipped")
                    rows_bad = [n for n, f in zip(names, m["row_finite"]) if not f]
                    bad.append((s_before, rows_bad or names))
                while bad and bad[0][0] <= loader.step - 1 - int(cfg.train.bad_step_window):
                    bad.popleft()
                if len(bad) >= int(cfg.train.max_bad_steps):
                    state = _rollback(r, stage_n, bad, loader, abstract, shardings, fresh_init,
                                      progress)
                    summary["rollbacks"] += 1
                    writer.close()
                    writer = metrics_lib.create_writer(cfg, workdir, jax.process_index(),
                                                       resume_step=int(state.step) + 1)
                    bad.clear()
                    t_last = time.perf_counter()
                    continue

                # checkpoints: rolling, a release at every data-chunk boundary, stage end
                s = loader.step
                done = s >= loader.steps
                release = bool(cfg.checkpoint.release_per_chunk) and (
                    done or loader.chunk_of_step(s) != loader.chunk_of_step(s - 1))
                preempt = sig.received or r.ckpt.reached_preemption(int(state.step))
                stop = stop_after_steps is not None and steps_run >= stop_after_steps
                every = int(cfg.checkpoint.every_steps)
                if done or release or preempt or stop or (every > 0 and s % every == 0):
                    if done and cfg.train.eval_every == 0 or (
                            cfg.train.eval_every and s % cfg.train.eval_every == 0):
                        ev = _evaluate(r, eval_fn, state.params, loader, bsh)
                        if ev:
                            writer.write_scalars(int(state.step), dict(
                                stage=stage_n, chunk=chunk, **ev))
                    writer.flush()
                    _save(r, state, stage_n, loader, release=release or done,
                          force=bool(preempt or stop), done=done)
                    if release or done:
                        log_plot()
                elif cfg.train.eval_every and s % cfg.train.eval_every == 0:
                    ev = _evaluate(r, eval_fn, state.params, loader, bsh)
                    writer.write_scalars(int(state.step), dict(stage=stage_n, chunk=chunk, **ev))
                t_last = time.perf_counter()   # step_time: data + step, not evals / saves
                if preempt or stop:
                    why = f"signal {sig.received}" if sig.received else (
                        "preemption notice" if preempt else f"stop after {steps_run} steps")
                    progress.close()
                    r.ckpt.wait()
                    writer.close()
                    summary.update(preempted=why, final_step=int(state.step),
                                   steps_run=steps_run)
                    print(f"crystal.train: stopped ({why}); checkpoint "
                          f"{r.ckpt.directory}/{int(state.step)}; rerun the same command to "
                          "continue", flush=True)
                    r.ckpt.close()
                    return summary
            # ------------------------------------------------------------- next stage
            loader.close()
            if stage_n == len(r.names):
                break
            stage_n += 1
            loader = new_loader(stage_n)
            state = _enter_stage(r, stage_n, state, fresh_init)
            progress.write(f"stage {stage_n} from step {int(state.step)}")

    progress.close()
    r.ckpt.wait()
    log_plot()
    writer.close()
    r.ckpt.close()
    summary.update(final_step=int(state.step), steps_run=steps_run,
                   releases=r.ckpt.release_steps())
    return summary


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v if isinstance(v, (int, float, str, bool)) else str(v)


def _rollback(r: _Run, stage_n: int, bad, loader, abstract, shardings, fresh_init, progress):
    """Back to the last checkpoint before the first bad step; quarantine the data chunk with
    the most non-finite rows in the bad steps (rows are independent in the forward pass, so
    a data fault shows in its own rows' losses), from that step on; log it in
    quarantine.json."""
    counts = collections.Counter()
    for _, names in bad:
        counts.update(names)
    culprit, hits = counts.most_common(1)[0]
    skipped_now = {s.chunk for s in loader.mixture.skips}
    if culprit in skipped_now:
        raise TrainError(f"stage {stage_n}: {len(bad)} non-finite steps within "
                         f"{r.cfg.train.bad_step_window} steps although chunk {culprit} is "
                         "already quarantined; not a data problem (check the LR / config)")
    first_bad = bad[0][0]
    r.ckpt.wait()
    stage_start_global = None
    cands = []
    for s in r.ckpt.all_steps():
        m = r.ckpt.read_meta(s)
        if int(m["stage"]) == stage_n and int(m["stage_step"]) <= first_bad:
            cands.append((s, m, "resume"))
        elif int(m["stage"]) == stage_n - 1 and m.get("stage_done"):
            cands.append((s, m, "after"))
    cands = [c for c in cands if c[2] == "resume" or not any(d[2] == "resume" for d in cands)]
    if not cands:
        raise TrainError(f"stage {stage_n}: {len(bad)} non-finite steps and no checkpoint "
                         f"before stage step {first_bad} in {r.ckpt.directory} to roll back to")
    step, meta, kind = max(cands, key=lambda c: c[0])
    state, data_state, _ = _restore(r, r.ckpt, step, abstract, shardings, "rollback")
    if kind == "resume":
        loader.set_state(data_state)
    else:
        state = _enter_stage(r, stage_n, state, fresh_init)
        loader.set_state({**loader.get_state(), "step": 0})
    del stage_start_global
    for s in r.ckpt.all_steps():   # the poisoned timeline's checkpoints: kept, set aside
        if s > step:
            r.ckpt.set_aside(s, Path(r.workdir) / "quarantine" / "checkpoints")
    from_step = loader.step
    loader.skip_chunk(culprit, from_step=from_step)
    r.tokens_seen = int(meta.get("tokens_seen", 0))
    r.skipped_total = int(meta.get("skipped_steps", 0)) + len(bad)
    rec = dict(stage=stage_n, chunk=culprit, from_stage_step=from_step,
               bad_stage_steps=[int(s) for s, _ in bad], in_bad_steps=hits,
               rolled_back_to_step=int(step), time=time.time())
    _quarantine(r, rec)
    progress.write(f"warning: {len(bad)} bad steps in stage {stage_n}; rolled back to step "
                   f"{step}, chunk {culprit} quarantined from stage step {from_step} "
                   f"(see {r.workdir / QUARANTINE_FILE})")
    return state


# ============================================================================= CLI


FLAGS = (
    cli.Flag("workdir", "run directory (default: runs/<config name>)"),
    cli.Flag("stage", "run stage N alone (from stage N-1's final checkpoint or --init_from); "
             "default: every remaining stage", int),
    cli.Flag("init_from", "checkpoint to start from when the workdir has none: WORKDIR, "
             "WORKDIR/checkpoints or WORKDIR/checkpoints/STEP"),
    cli.Flag("stop_after_steps", "checkpoint and stop after N steps", int),
) + sharding_lib.cli_flags()


def _main(a):
    sharding_lib.initialize(sharding_lib.settings_from_args(a))
    cfg = a.cfg
    workdir = a.workdir or str(Path("runs") / cfg.name)
    out = run(cfg, workdir, stage=a.stage, init_from=a.init_from,
              stop_after_steps=a.stop_after_steps)
    if out.get("preempted"):
        return 0
    if out["start"]["kind"] == "complete":
        print(f"crystal.train: {workdir} is complete (step {out['final_step']}); "
              "nothing to do", flush=True)
    print(f"crystal.train: done at step {out['final_step']}\n"
          f"  checkpoints {out['checkpoints']}\n  metrics     {out['metrics']}\n"
          f"  plot        {out['plot']}", flush=True)
    return 0


def main(argv=None):
    cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_REQUIRED,
            argv=argv, prog="python -m crystal.train")


if __name__ == "__main__":
    main()
