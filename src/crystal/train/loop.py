"""The host loop of `crystal.train`, top to bottom.

`run` is a list of named phases:

    _check          every user mistake (stage, --init_from, mesh, a workdir of another
                    config) and where this invocation starts, before anything is written
    _claim          the data prepared (crystal.data.prepare), the workdir claimed (run.json)
    _Run            mesh, shardings, the compiled step, checkpoints, metrics writer
    _start          resume | after a finished stage | --init_from | scratch
    _train_stage    per stage: dispatch step k+1, then read step k's metrics (the host
                    never waits for the device); checkpoints at data-chunk boundaries, every
                    N steps, at the stage end and on signals; rollback on bad data
    _Run.close      wait for the last save, plot, the summary

Stages as LLM360 ran them: `stage=N` runs stage N alone (from stage N-1's final checkpoint,
or `init_from`) and stops after its stage-final checkpoint; `stage=0` runs every remaining
stage in order. The same command after any interruption (SIGTERM, kill -9) continues from
the last checkpoint, bit-exactly; re-running a finished stage says so and does nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np

from crystal import checkpoint as ckpt_lib
from crystal import config as config_lib
from crystal import fileio
from crystal import metrics as metrics_lib
from crystal import optim as optim_lib
from crystal import sharding as sharding_lib
from crystal.data import loader as loader_lib
from crystal.data import prepare as prepare_lib
from crystal.errors import MetricsError, TrainError
from crystal.metrics import plots
from crystal.train import step as step_lib
from crystal.train.ledger import Ledger
from crystal.train.watch import BadSteps, Progress, Signals, SpikeDetector

log = logging.getLogger("crystal.train")

RUN_FILE = "run.json"
QUARANTINE_FILE = "quarantine.json"


def run(cfg, workdir, stage: int | None = None, init_from: str | None = None,
        stop_after_steps: int | None = None) -> dict:
    """Trains `cfg` in `workdir` from wherever it stands; returns a summary dict.

    stage: None -> cfg.train.stage; 0 runs every remaining stage, N runs stage N alone.
    init_from: a checkpoint (workdir, checkpoints dir or step dir) to take params (and the
    optimizer state, unless the stage resets it) from when this workdir has none.
    stop_after_steps: stop (with a checkpoint, as on SIGTERM) after this many steps of this
    invocation (tests, benchmarks).
    """
    cfg = config_lib.validate(cfg)
    workdir = Path(workdir)
    mesh, start = _check(cfg, workdir, stage, init_from)
    summary = dict(workdir=str(workdir), checkpoints=str(ckpt_lib.checkpoint_dir(workdir)),
                   metrics=str(workdir / "metrics.jsonl"), plot=str(workdir / "loss.png"),
                   start=start, preempted=None, rollbacks=0, steps_run=0)
    if start["kind"] == "complete":
        return dict(summary, final_step=start["step"])
    manifest, data_sha = _claim(cfg, workdir)
    r = _Run(cfg, workdir, mesh, manifest, data_sha, summary, stop_after_steps)
    state, loader = _start(r, start)
    with Signals() as sig:
        for n in range(start["stage"], start["last"] + 1):
            if n > start["stage"]:
                loader = r.loader(n)
                state = _enter_stage(r, n, state)
                r.progress.write(f"stage {n} from step {r.step}")
                r.event("stage_start", state, loader, n)
            state, why = _train_stage(r, n, state, loader, sig)
            loader.close()
            if why:
                r.event("stop", state, loader, n, reason=why)
                return r.close(state, preempted=why)
    r.event("finish", state, loader, start["last"])
    return r.close(state)


# ----------------------------------------------------------------------------- phase 1


def _check(cfg, workdir: Path, stage: int | None, init_from: str | None):
    """(mesh, start): every user mistake found before a file is written."""
    stage_flag = int(cfg.train.stage if stage is None else stage)
    n_stages = len(config_lib.stage_names(cfg))
    if not 0 <= stage_flag <= n_stages:
        raise TrainError(f"--stage={stage_flag}: config {cfg.name} has stages 1..{n_stages} "
                         "(or 0: every remaining stage)")
    if init_from:
        ckpt_lib.find_checkpoint(init_from)       # a CheckpointError naming the path
    check_workdir(cfg, workdir, claim=False)
    mesh = _make_mesh(cfg)
    return mesh, plan_start(cfg, workdir, stage_flag, init_from)


def _make_mesh(cfg):
    n = math.prod(int(cfg.mesh[a]) for a in sharding_lib.MESH_AXES)
    devices = jax.devices() if cfg.mesh.preset else jax.devices()[:n]
    return sharding_lib.make_mesh(cfg, devices)


def check_workdir(cfg, workdir: Path, claim: bool = True) -> dict | None:
    """Refuses a workdir holding another config's run; with `claim`, records this one.

    The identity is config.fingerprint (model, tokenizer, data, stages, seed): train.*,
    checkpoint.* and metrics.* may change between restarts, the run's definition may not.
    """
    path = Path(workdir) / RUN_FILE
    fp = config_lib.fingerprint(cfg)
    if path.exists():
        have = fileio.read_json(path, TrainError)
        if have.get("fingerprint") != fp:
            raise TrainError(
                f"{workdir} holds a run of another config ({have.get('config_name')!r}, "
                f"fingerprint {have.get('fingerprint')}; this config {cfg.name!r} has {fp}); "
                "use another --workdir")
        return have
    if not claim:
        return None
    rec = dict(fingerprint=fp, config_name=cfg.name, created=time.time(),
               config=config_lib.to_json_dict(cfg), environment=fileio.environment())
    fileio.write_json(path, rec, sort_keys=True)
    return rec


def _latest(workdir: Path) -> tuple[int, dict] | None:
    """(step, meta) of the workdir's latest finalized checkpoint, read-only, or None."""
    d = ckpt_lib.checkpoint_dir(workdir)
    try:
        _, step = ckpt_lib.find_checkpoint(d)
    except ckpt_lib.CheckpointError:
        return None
    with ckpt_lib.Checkpointer(d, read_only=True) as c:
        return step, c.read_meta(step)


def plan_start(cfg, workdir: Path, stage_flag: int, init_from: str | None) -> dict:
    """Where this invocation starts and which stages it runs.

    Returns {'kind': 'resume'|'after'|'init_from'|'scratch'|'complete', 'stage', 'last',
    'step' or 'path'}: 'resume' continues a stage mid-way, 'after' starts `stage` from the
    previous stage's final checkpoint `step`.
    """
    last = len(config_lib.stage_names(cfg)) if stage_flag == 0 else stage_flag
    latest = _latest(workdir)
    if latest is None:
        start = stage_flag or 1
        if init_from:
            return dict(kind="init_from", stage=start, last=last, path=init_from)
        if start == 1 or config_lib.stage(cfg, start).init == "scratch":
            return dict(kind="scratch", stage=start, last=last)
        raise TrainError(
            f"--stage={start} starts from stage {start - 1}'s final checkpoint, but "
            f"{ckpt_lib.checkpoint_dir(workdir)} has none; run --stage={start - 1} first "
            "(or pass --init_from=PATH)")
    step, meta = latest
    s, done = int(meta["stage"]), bool(meta.get("stage_done"))
    want = stage_flag or (s + 1 if done else s)
    if want < s or (want == s and done) or want > last:
        return dict(kind="complete", stage=s, last=last, step=step)
    if want == s:
        return dict(kind="resume", stage=s, last=last, step=step)
    if want == s + 1 and done:
        return dict(kind="after", stage=want, last=last, step=step)
    raise TrainError(
        f"--stage={want}: {workdir} stands at stage {s} "
        f"{'(finished)' if done else '(in progress)'} at step {step}; run "
        f"--stage={s if not done else s + 1} first")


# ----------------------------------------------------------------------------- phase 2, 3


def _claim(cfg, workdir: Path):
    """The workdir's data (prepared if absent) and its claim by this config."""
    enable_compilation_cache(cfg)
    manifest = prepare_lib.ensure_prepared(cfg, workdir)
    check_workdir(cfg, workdir)
    _, data_sha = loader_lib.read_manifest(workdir)
    return manifest, data_sha


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


class _Run:
    """One `run` call's host state: the compiled step and what the phases share."""

    def __init__(self, cfg, workdir: Path, mesh, manifest: dict, data_sha: str,
                 summary: dict, stop_after_steps: int | None):
        self.cfg, self.workdir, self.mesh, self.summary = cfg, workdir, mesh, summary
        self.data_sha256 = data_sha
        self.group_names = sorted(manifest["groups"])
        self.stop_after = stop_after_steps
        self.ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir),
                                          keep_recent=int(cfg.checkpoint.keep_recent),
                                          async_save=bool(cfg.checkpoint.async_save))
        devices = mesh.devices.flat
        self.num_devices, self.device_kind = mesh.devices.size, next(iter(devices)).device_kind
        # One optimizer structure, abstract state and compiled step for every stage: the
        # stage's schedule is optimizer state (optim.make_optimizer).
        self.optimizer = optim_lib.make_optimizer(cfg, 1)
        self.abstract = step_lib.abstract_state(cfg, self.optimizer)
        self.shardings = sharding_lib.state_shardings(self.abstract, cfg, mesh)
        self.batch_sharding = sharding_lib.batch_sharding(cfg, mesh)
        self.rows = int(cfg.train.global_batch_size)
        self.data_slice = sharding_lib.data_slice(self.batch_sharding, self.rows)
        n_src = len(self.group_names)
        self.step_fn = sharding_lib.shard_train_step(
            step_lib.make_train_step(cfg, self.optimizer, n_src), cfg, mesh, self.shardings)
        self.eval_fn = jax.jit(step_lib.make_eval_step(cfg, n_src))
        self.flops_per_token = metrics_lib.flops_per_token(cfg)
        self.peak = metrics_lib.peak_flops_per_device(
            self.device_kind, cfg.metrics.get("peak_flops_per_device", 0.0))
        self.step = 0                # the global step of the host's latest dispatched state
        self.steps_run = 0
        self.tokens_seen = self.skipped_total = 0
        self.writer = self.progress = None
        self.ledger = Ledger(workdir, enabled=jax.process_index() == 0)

    def event(self, event: str, state, loader, n: int, **fields):
        """A ledger line: the event, where the run stands (global step, stage, stage step,
        data chunk) and the base LR of the next update."""
        self.ledger.record(event, step=self.step, stage=n, stage_step=loader.step,
                           chunk=loader.chunk_of_step(min(loader.step, loader.steps - 1)),
                           lr=float(optim_lib.current_lr(state.opt_state,
                                                         self.cfg.optim.schedule_index)),
                           tokens_seen=int(self.tokens_seen), **fields)

    def loader(self, n: int) -> loader_lib.StageLoader:
        return loader_lib.StageLoader(self.cfg, self.workdir, n, *self.data_slice)

    def fresh_init(self) -> step_lib.TrainState:
        key = jax.random.key(int(self.cfg.seed))
        with sharding_lib.mesh_context(self.cfg, self.mesh):
            return jax.jit(lambda k: step_lib.init_state(self.cfg, k, self.optimizer),
                           out_shardings=self.shardings)(key)

    def open_writer(self):
        """The metrics writer, dropping what an abandoned attempt logged after self.step."""
        if self.writer is not None:
            self.writer.close()
        self.writer = metrics_lib.create_writer(self.cfg, self.workdir, jax.process_index(),
                                                resume_step=self.step + 1)

    def restore(self, ckpt: ckpt_lib.Checkpointer, step: int, what: str):
        target = sharding_lib.abstract_with_shardings(self.abstract.to_dict(),
                                                      self.shardings.to_dict())
        try:
            st, data, meta = ckpt.restore(step, target)
        except (ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{ckpt.directory}/{step}: cannot restore into this config's "
                             f"train state ({what}): {str(e).splitlines()[0][:300]}") from None
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.skipped_total = int(meta.get("skipped_steps", 0))
        return step_lib.TrainState.from_dict(st), data, meta

    def save(self, state, n: int, loader, release=False, force=False, done=False) -> bool:
        meta = dict(config=config_lib.to_json_dict(self.cfg),
                    fingerprint=config_lib.fingerprint(self.cfg), data_sha256=self.data_sha256,
                    stage=n, stage_step=loader.step, stage_done=done,
                    chunk=loader.chunk_of_step(min(loader.step, loader.steps - 1)),
                    tokens_seen=int(self.tokens_seen), skipped_steps=int(self.skipped_total))
        return self.ckpt.save(self.step, state.to_dict(), loader.get_state(), meta,
                              release=release, force=force)

    def plot(self):
        if self.cfg.metrics.plot and jax.process_index() == 0:
            self.writer.flush()
            try:
                plots.plot_loss(self.workdir / "metrics.jsonl", self.workdir / "loss.png")
            except MetricsError as e:
                log.warning("loss plot: %s", e)

    def close(self, state, preempted: str | None = None) -> dict:
        self.progress.close()
        self.ckpt.wait()
        if preempted is None:
            self.plot()
        self.writer.close()
        self.ckpt.close()
        self.summary.update(final_step=self.step, steps_run=self.steps_run,
                            preempted=preempted, releases=self.ckpt.release_steps())
        if preempted:
            print(f"crystal.train: stopped ({preempted}); checkpoint "
                  f"{self.ckpt.directory}/{self.step}; rerun the same command to continue",
                  flush=True)
        return self.summary


# ----------------------------------------------------------------------------- phase 4


def _start(r: _Run, start: dict):
    """(state, loader) where `start` says; a new timeline saves its first checkpoint at its
    first stage boundary (`r.save_at_start`)."""
    n = start["stage"]
    loader = r.loader(n)
    r.save_at_start = start["kind"] in ("scratch", "init_from")
    if start["kind"] == "resume":
        state, data_state, _ = r.restore(r.ckpt, start["step"], "resume")
        loader.set_state(data_state)
    elif start["kind"] == "after":
        state, _, _ = r.restore(r.ckpt, start["step"], "stage start")
        state = _enter_stage(r, n, state)
    elif start["kind"] == "init_from":
        src, step = ckpt_lib.open_checkpoint(start["path"])
        state, _, _ = r.restore(src, step, "--init_from")
        src.close()
        if config_lib.stage(r.cfg, n).init != "scratch":
            state = _enter_stage(r, n, state)
        r.summary["init_from"] = f"{src.directory}/{step}"
        r.summary["origin"] = _origin(src.directory, step)
    else:
        state = r.fresh_init()
    r.step = int(state.step)
    r.open_writer()
    if r.save_at_start and r.step == 0:
        r.writer.write_hparams(dict(_flat(config_lib.to_json_dict(r.cfg))))
    total = sum(config_lib.stage(r.cfg, i).steps for i in range(n, start["last"] + 1))
    r.progress = Progress(r.cfg.train.progress, total, loader.step)
    r.progress.write(f"crystal.train: {r.cfg.name} in {r.workdir} ({start['kind']} at stage "
                     f"{n}, step {r.step}; {r.num_devices} x {r.device_kind})")
    r.event("start", state, loader, n, kind=start["kind"], stages=[n, start["last"]],
            origin=r.summary.get("origin"), fingerprint=config_lib.fingerprint(r.cfg),
            code=fileio.git_commit(), processes=jax.process_count(),
            python=fileio.environment()["python"],
            packages_sha256=fileio.environment()["packages_sha256"],
            devices=f"{r.num_devices} x {r.device_kind}")
    if start["kind"] != "resume":
        r.event("stage_start", state, loader, n)
    return state, loader


def _origin(directory: Path, step: int) -> dict:
    """Where an --init_from checkpoint comes from: its path and step, and the release
    bundle holding it if any (a directory with a MANIFEST.sha256; the bundle's id is that
    file's sha256, see crystal.release)."""
    out = dict(path=str(directory / str(step)), step=int(step))
    for d in Path(directory).resolve().parents:
        if (d / "MANIFEST.sha256").is_file():
            out.update(bundle=str(d), bundle_id=fileio.file_sha256(d / "MANIFEST.sha256"))
            break
    return out


def _enter_stage(r: _Run, n: int, state):
    return step_lib.enter_stage(r.cfg, n, state, r.fresh_init)


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v if isinstance(v, (int, float, str, bool)) else str(v)


# ----------------------------------------------------------------------------- phase 5


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics the host has not read yet."""
    stage: int
    stage_step: int          # the batch's step within the stage
    step: int                # the global step the update produces
    chunk: int
    names: list[str]         # each row's data shard, 'group:index'
    metrics: dict            # device arrays
    data_wait: float


@dataclasses.dataclass
class _Boundary:
    """What happens after a step: evaluate, save (a release?), stop (why?)."""
    evaluate: bool
    save: bool
    release: bool
    done: bool
    why: str | None


def _train_stage(r: _Run, n: int, state, loader, sig: Signals):
    """Stage n from loader.step to its end; returns (state, None), or (state, why) when a
    signal, a preemption notice or stop_after_steps stopped it.

    Step k+1 is dispatched before step k's metrics are read, so the host never waits for the
    device: logging, tokens seen and the bad-step window run one step late, and are drained
    before a checkpoint or an eval, which must describe the state they save."""
    watch = (BadSteps(r.cfg.train.bad_step_window, r.cfg.train.max_bad_steps),
             SpikeDetector(r.cfg.train.spike_window, r.cfg.train.spike_zscore))
    if r.save_at_start:
        r.save(state, n, loader)
        r.save_at_start = False
    pending, r.t_last = None, time.perf_counter()
    while loader.step < loader.steps:
        t0 = time.perf_counter()
        batch, names = _next_batch(r, loader)
        data_wait = time.perf_counter() - t0
        state, metrics = r.step_fn(state, batch)
        r.step += 1
        r.steps_run += 1
        last = pending
        pending = _Pending(n, loader.step - 1, r.step, loader.chunk_of_step(loader.step - 1),
                           names, metrics, data_wait)
        if last is not None and _account(r, last, watch):
            state, pending = _rollback(r, n, watch[0], loader), None
            continue
        b = _boundary(r, loader, sig)
        if b is None:
            continue
        if _account(r, pending, watch):
            state, pending = _rollback(r, n, watch[0], loader), None
            continue
        pending = None
        _at_boundary(r, n, state, loader, b)
        if b.why:
            return state, b.why
    return state, None


def _next_batch(r: _Run, loader):
    """The next batch on the mesh, and each row's shard name (for quarantine)."""
    batch = next(loader)
    g, c = np.asarray(batch["group"]).reshape(-1), np.asarray(batch["shard"]).reshape(-1)
    names = [f"{r.group_names[int(a)]}:{int(b)}" for a, b in zip(g, c)]
    # Always present (zeros unless faults are injected), so there is one compiled step.
    batch["poison"] = _poison(names, r.cfg.train.fault_nan_shards)
    dev = sharding_lib.global_batch({k: v for k, v in batch.items()
                                     if k in step_lib.STEP_KEYS}, r.batch_sharding, r.rows)
    return dev, names


def _poison(names: list[str], patterns: str) -> np.ndarray:
    """Per-row NaN for rows of `train.fault_nan_shards` (fnmatch on 'group:index'), else 0."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return np.asarray([np.nan if any(fnmatch.fnmatchcase(nm, p) for p in pats) else 0.0
                       for nm in names], np.float32)


def _account(r: _Run, p: _Pending, watch) -> bool:
    """Reads step p's metrics (waits for that step only), logs them, updates the counters
    and the bad-step window; True when the window calls for a rollback."""
    bad, spikes = watch
    m = jax.device_get(p.metrics)
    now = time.perf_counter()
    dt, r.t_last = now - r.t_last, now
    skipped, loss = int(m["skipped"]), float(m["loss"])
    r.tokens_seen += int(m["tokens"])
    r.skipped_total += skipped
    tok_s = r.rows * r.cfg.data.seq_len / max(dt, 1e-9)
    z = spikes(loss) if not skipped else 0.0
    rec = dict(stage=p.stage, chunk=p.chunk, stage_step=p.stage_step + 1, loss=loss,
               grad_norm=float(m["grad_norm"]), param_norm=float(m["param_norm"]),
               update_norm=float(m["update_norm"]), tokens=int(m["tokens"]),
               tokens_seen=r.tokens_seen, tokens_per_s=tok_s,
               mfu=tok_s * r.flops_per_token / (r.num_devices * r.peak), step_time=dt,
               data_wait=p.data_wait, skipped=skipped, skipped_steps=r.skipped_total,
               loss_zscore=z, spike=int(z > spikes.z))
    for k, v in optim_lib.group_lrs(r.cfg, float(m["lr"])).items():
        rec["lr" if k == "base" else f"lr/{k}"] = v
    for i, g in enumerate(r.group_names):
        if m["source_tokens"][i] > 0:
            rec[f"loss/{g}"] = float(m["source_loss"][i])
    rec.update((f"memory/{k}", v) for k, v in metrics_lib.device_memory().items())
    if p.step % max(int(r.cfg.train.log_every), 1) == 0 or skipped:
        r.writer.write_scalars(p.step, rec)
    if rec["spike"]:
        r.progress.write(f"warning: loss spike at step {p.step}: {loss:.4f} (z={z:.1f})")
    r.progress.update(p.step, p.stage, loss, tok_s)
    if skipped:
        r.progress.write(f"warning: non-finite loss/grad at step {p.step} (stage {p.stage} "
                         f"step {p.stage_step}); update skipped")
        rows_bad = [nm for nm, f in zip(p.names, m["row_finite"]) if not f]
        bad.add(p.stage_step, rows_bad or p.names)
    bad.expire(p.stage_step)
    return bad.full()


def _boundary(r: _Run, loader, sig: Signals) -> _Boundary | None:
    """What the step just dispatched ends: a data chunk (release checkpoint), the stage,
    an every-N checkpoint or eval, a signal, a preemption notice, stop_after_steps."""
    cfg, s = r.cfg, loader.step
    done = s >= loader.steps
    release = bool(cfg.checkpoint.release_per_chunk) and (
        done or loader.chunk_of_step(s) != loader.chunk_of_step(s - 1))
    preempt = sig.received or r.ckpt.reached_preemption(r.step)
    stop = r.stop_after is not None and r.steps_run >= r.stop_after
    every, ev = int(cfg.checkpoint.every_steps), int(cfg.train.eval_every)
    evaluate = (done and ev == 0) or bool(ev and s % ev == 0)
    save = done or release or bool(preempt) or stop or (every > 0 and s % every == 0)
    if not (save or evaluate):
        return None
    why = (f"signal {sig.received}" if sig.received else "preemption notice" if preempt
           else f"stop after {r.steps_run} steps" if stop else None)
    return _Boundary(evaluate, save, release or done, done, why)


def _at_boundary(r: _Run, n: int, state, loader, b: _Boundary):
    if b.evaluate:
        ev = _evaluate(r, state.params, loader)
        if ev:
            r.writer.write_scalars(r.step, dict(stage=n, chunk=loader.chunk_of_step(
                loader.step - 1), **ev))
    if b.save:
        r.writer.flush()
        r.save(state, n, loader, release=b.release, force=b.why is not None, done=b.done)
        if b.release:
            r.plot()
    if b.done:
        r.event("stage_end", state, loader, n, skipped_steps=int(r.skipped_total))
    r.t_last = time.perf_counter()      # step_time: data + step, not evals or saves


def _evaluate(r: _Run, params, loader) -> dict:
    """Mean validation loss per data group and over all groups: every group of the run at
    every evaluation, not only the stage's, so the eval curves of all stages are on one
    fixed held-out set and comparable (a stage's mixture changes what it trains on, not
    what it is measured on)."""
    n = int(r.cfg.train.eval_batches)
    if n <= 0:
        return {}
    out, tot, cnt = {}, 0.0, 0.0
    for g, batches in loader.val_batches(n, groups=r.group_names).items():
        s = c = 0.0
        for b in batches:
            gb = sharding_lib.global_batch({k: v for k, v in b.items()
                                            if k in step_lib.STEP_KEYS},
                                           r.batch_sharding, r.rows)
            ls, tk = r.eval_fn(params, gb)
            s, c = s + float(ls), c + float(tk)
        out[f"eval/{g}/loss"] = s / max(c, 1.0)
        tot, cnt = tot + s, cnt + c
    if cnt:
        out["eval/loss"] = tot / cnt
    return out


# ----------------------------------------------------------------------------- rollback


def _rollback(r: _Run, n: int, bad: BadSteps, loader):
    """Back to the last checkpoint before the first bad step; quarantine the data shard with
    the most non-finite rows in the bad steps (rows are independent in the forward pass, so
    a data fault shows in its own rows' losses), from that step on; log it in
    quarantine.json. The abandoned timeline's checkpoints are set aside, never deleted."""
    culprit, hits = bad.culprit()
    if culprit in {s.shard for s in loader.mixture.skips}:
        raise TrainError(f"stage {n}: {len(bad.steps)} non-finite steps within "
                         f"{r.cfg.train.bad_step_window} steps although shard {culprit} is "
                         "already quarantined; not a data problem (check the LR / config)")
    first_bad = bad.steps[0][0]
    r.ckpt.wait()
    step, meta, kind = _rollback_target(r, n, first_bad)
    state, data_state, _ = r.restore(r.ckpt, step, "rollback")
    if kind == "resume":
        loader.set_state(data_state)
    else:
        state = _enter_stage(r, n, state)
        loader.set_state({**loader.get_state(), "step": 0})
    for s in r.ckpt.all_steps():
        if s > step:
            r.ckpt.set_aside(s, r.workdir / "quarantine" / "checkpoints")
    from_step = loader.step
    loader.skip_shard(culprit, from_step=from_step)
    r.skipped_total += len(bad.steps)
    rec = dict(stage=n, shard=culprit, from_stage_step=from_step,
               bad_stage_steps=[int(s) for s, _ in bad.steps], in_bad_steps=hits,
               rolled_back_to_step=int(step), time=time.time())
    _quarantine(r, rec)
    r.step = int(step)
    r.event("rollback", state, loader, n, to_step=int(step),
            bad_stage_steps=rec["bad_stage_steps"])
    r.event("quarantine", state, loader, n, shard=culprit, from_stage_step=from_step)
    r.progress.write(f"warning: {len(bad.steps)} bad steps in stage {n}; rolled back to step "
                     f"{step}, shard {culprit} quarantined from stage step {from_step} "
                     f"(see {r.workdir / QUARANTINE_FILE})")
    bad.clear()
    r.summary["rollbacks"] += 1
    r.open_writer()
    r.t_last = time.perf_counter()
    return state


def _rollback_target(r: _Run, n: int, first_bad: int):
    """(step, meta, 'resume'|'after'): the latest checkpoint of stage n before `first_bad`,
    else the previous stage's final one."""
    cands = []
    for s in r.ckpt.all_steps():
        m = r.ckpt.read_meta(s)
        if int(m["stage"]) == n and int(m["stage_step"]) <= first_bad:
            cands.append((s, m, "resume"))
        elif int(m["stage"]) == n - 1 and m.get("stage_done"):
            cands.append((s, m, "after"))
    if any(c[2] == "resume" for c in cands):
        cands = [c for c in cands if c[2] == "resume"]
    if not cands:
        raise TrainError(f"stage {n}: non-finite steps and no checkpoint before stage step "
                         f"{first_bad} in {r.ckpt.directory} to roll back to")
    return max(cands, key=lambda c: c[0])


def _quarantine(r: _Run, rec: dict):
    path = r.workdir / QUARANTINE_FILE
    have = fileio.read_json(path, TrainError) if path.exists() else {"incidents": []}
    have["incidents"].append(rec)
    have["shards"] = sorted({i["shard"] for i in have["incidents"]})
    fileio.write_json(path, have, sort_keys=True)
