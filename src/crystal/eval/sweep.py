"""The checkpoint sweep: every selected checkpoint of a run, once per task.

    sweep(workdir, ['perplexity', 'memorization'], checkpoints='release', shard=(0, 1))

Phases: `_jobs` and `_checkpoints` find every user mistake before anything is read or
written (the workdir, the tasks, their settings and flags, the checkpoints and that they
belong to the run's config, the shard); then per checkpoint of this shard, ascending, the
tasks whose record is missing (or describes an earlier checkpoint saved at that step) are
evaluated; the params are restored only if one is, once for all its tasks. Each result goes
to the run's metrics (JSONL/TensorBoard/W&B, `evals/TASK/NAME` at the checkpoint's step) and
then to its record (crystal.eval.records), so a killed sweep loses at most the pair in
flight and a re-run skips what is done. Last, the figures of every task that has new records
(or whose figures are missing or stale) are redrawn from all its records, every shard's.

Shards: `shard=(i, n)` takes checkpoints i, i + n, ... of the selection, so n hosts (a
Slurm array, a TPU pod's hosts) split a sweep with no coordination; records do not depend on
which shard wrote them.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from tqdm import tqdm

from crystal import checkpoint as ckpt_lib
from crystal import config as config_lib
from crystal import decode as decode_lib
from crystal import fileio
from crystal import metrics as metrics_lib
from crystal import sharding as sharding_lib
from crystal.data import replay
from crystal.errors import CheckpointError, UsageError
from crystal.eval import records as rec_lib
from crystal.eval import tasks as tasks_lib
from crystal.train.loop import enable_compilation_cache


@dataclasses.dataclass
class _Job:
    """One task of the sweep: its settings, its records' directory, what it added."""
    task: tasks_lib.Task
    settings: dict
    directory: Path
    ctx: tasks_lib.Context | None = None
    new: int = 0


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; anything else is a UsageError naming --shard."""
    i, slash, n = str(text).partition("/")
    if not (slash and i.strip().isdigit() and n.strip().isdigit()) or int(n) < 1 \
            or int(i) >= int(n):
        raise UsageError(f"--shard={text}: expected I/N with 0 <= I < N (e.g. 0/4)")
    return int(i), int(n)


def parse_settings(items) -> dict[str, dict[str, str]]:
    """['memorization.k=16', ...] -> {'memorization': {'k': '16'}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        task, dot, field = key.rpartition(".")
        if not (eq and dot and task and field):
            raise UsageError(f"--settings={item}: expected TASK.FIELD=VALUE")
        out.setdefault(task, {})[field] = value
    return out


def select_steps(ckpt: ckpt_lib.Checkpointer, spec: str) -> list[int]:
    """'release' | 'all' | 'STEP,STEP,...' -> ascending steps that exist."""
    spec = str(spec).strip()
    if spec == "release":
        return ckpt.release_steps()
    if spec == "all":
        return ckpt.all_steps()
    have, out = set(ckpt.all_steps()), set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if not part.isdigit():
            raise UsageError(f"--checkpoints={spec}: expected release, all or steps "
                             f"(e.g. 120,240), got {part!r}")
        if int(part) not in have:
            raise CheckpointError(f"--checkpoints={spec}: {ckpt.directory}/{part}: no such "
                                  f"checkpoint (have {sorted(have)})")
        out.add(int(part))
    return sorted(out)


def open_checkpoints(workdir: Path) -> ckpt_lib.Checkpointer:
    directory = ckpt_lib.checkpoint_dir(workdir)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoints (is {workdir} a crystal run?)")
    return ckpt_lib.Checkpointer(directory, read_only=True)


def _checkpoints(reader: ckpt_lib.Checkpointer, cfg, spec: str,
                 shard) -> list[tasks_lib.Checkpoint]:
    """This shard's checkpoints of the selection, each checked to be of the run's config."""
    fp = config_lib.fingerprint(cfg)
    out = []
    for step in select_steps(reader, spec)[shard[0]::shard[1]]:
        meta = reader.read_meta(step)
        if meta.get("fingerprint") != fp:
            raise CheckpointError(
                f"{reader.directory}/{step}: a checkpoint of another config (fingerprint "
                f"{meta.get('fingerprint')}; the run's config {cfg.name!r} has {fp})")
        out.append(tasks_lib.Checkpoint(step, reader.directory / str(step), meta,
                                        fileio.json_sha256(meta)))
    return out


def _jobs(workdir: Path, names, settings, seed: int, flags: dict) -> list[_Job]:
    per = parse_settings(settings)
    unknown = sorted(set(per) - set(names))
    if unknown:
        raise UsageError(f"--settings={unknown[0]}.*: task {unknown[0]!r} is not in --tasks")
    jobs = []
    for name in dict.fromkeys(names):
        task = tasks_lib.get(name)
        for need in task.needs:
            if not flags.get(need):
                raise UsageError(f"--tasks={name}: this task needs --{need}")
        s = tasks_lib.resolve_settings(task, per.get(name, {}))
        if task.check is not None:
            task.check(s)
        jobs.append(_Job(task, s, rec_lib.task_dir(workdir, name, s, seed)))
    if not jobs:
        raise UsageError("--tasks: no task given")
    return jobs


class _Params:
    """One checkpoint's params, restored on first use (a checkpoint whose records are all
    done is never read), placed on the mesh (or the default device), hashed once."""

    def __init__(self, reader: ckpt_lib.Checkpointer, ckpt: tasks_lib.Checkpoint, cfg, mesh):
        self.reader, self.ckpt, self.cfg, self.mesh = reader, ckpt, cfg, mesh
        self.params = self.sha256 = self._decoder = None

    def get(self):
        if self.params is None:
            host, _ = self.reader.restore_params(self.ckpt.step)
            self.sha256 = ckpt_lib.params_sha256(host)
            self.params = sharding_lib.put_params(host, self.cfg, self.mesh)
        return self.params

    def decoder(self) -> decode_lib.Decoder:
        if self._decoder is None:
            self._decoder = decode_lib.Decoder(self.get(), self.cfg, self.mesh)
        return self._decoder


def sweep(workdir, names, checkpoints: str = "release", shard=(0, 1), seed: int = 0,
          settings=(), flags: dict | None = None, mesh=None, progress: bool = True,
          figures: bool = True, out=print) -> dict:
    """Evaluates; returns {'evaluated', 'skipped', 'figures', 'checkpoints'} (see the
    module docstring). flags: sweep-wide switches tasks may need ({'allow_code_execution':
    True}); mesh: a jax Mesh for params and decoding (None: the default device); figures:
    False leaves the figures to a later sweep (shards of a big sweep need draw only once)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UsageError(f"--workdir={workdir}: no such directory")
    cfg = replay.run_config(workdir)
    enable_compilation_cache(cfg)     # a re-run or another shard skips XLA compilation
    flags = dict(flags or {})
    jobs = _jobs(workdir, names, settings, seed, flags)
    reader = open_checkpoints(workdir)
    try:
        ckpts = _checkpoints(reader, cfg, checkpoints, shard)
        done = _evaluate_all(workdir, cfg, reader, ckpts, jobs, seed, flags, mesh, progress,
                             out)
    finally:
        reader.close()
    cache = done.pop("cache")
    done["figures"] = _summarize(workdir, cfg, jobs, seed, flags, cache) if figures else []
    return done


def _evaluate_all(workdir, cfg, reader, ckpts, jobs, seed, flags, mesh, progress, out):
    """The loop over (checkpoint, task) pairs; see the module docstring."""
    run = dict(config_name=cfg.name, fingerprint=config_lib.fingerprint(cfg),
               data_sha256=ckpts[0].meta.get("data_sha256") if ckpts else None)
    cache: dict = {}
    tokenizer = _run_tokenizer(workdir, cache)
    done = dict(evaluated=0, skipped=0, checkpoints=[c.step for c in ckpts], cache=cache)
    bar = tqdm(total=len(ckpts) * len(jobs), unit="eval", dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    say = out if bar.disable else bar.write
    writer = None
    try:
        for ckpt in ckpts:
            params = _Params(reader, ckpt, cfg, mesh)
            for job in jobs:
                bar.set_postfix_str(f"step {ckpt.step} {job.task.name}")
                path = rec_lib.record_path(job.directory, ckpt.step)
                have = rec_lib.read(path)
                if rec_lib.is_current(have, ckpt):
                    done["skipped"] += 1
                    bar.update(1)
                    continue
                t0 = time.perf_counter()
                job.ctx = tasks_lib.Context(workdir, cfg, job.settings, seed, flags, cache,
                                            params.decoder, tokenizer)
                result = job.task.evaluate(ckpt, params.get(), cfg, job.ctx)
                rec = rec_lib.make(job.task.name, ckpt, workdir, params.sha256, run,
                                   job.settings, seed, result)
                writer = writer or metrics_lib.create_writer(cfg, workdir)
                writer.write_scalars(ckpt.step, dict(
                    stage=ckpt.stage, **{f"evals/{job.task.name}/{k}": v
                                         for k, v in result.metrics.items()}))
                writer.flush()
                if have is not None:
                    rec_lib.set_aside(path, have)
                rec_lib.write(job.directory, rec)
                job.new += 1
                done["evaluated"] += 1
                bar.update(1)
                say(f"step {ckpt.step} {job.task.name}: {_brief(result.metrics)} "
                    f"({time.perf_counter() - t0:.1f} s)")
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return done


def _run_tokenizer(workdir: Path, cache: dict):
    """Context.tokenizer: the run's tokenizer, read on first use and kept in the sweep's
    cache for every checkpoint and task."""
    def tokenizer():
        if "run tokenizer" not in cache:
            cache["run tokenizer"] = replay.run_tokenizer(workdir)
        return cache["run tokenizer"]
    return tokenizer


def _brief(metrics: dict) -> str:
    keys = [k for k in metrics if "/" not in k] or list(metrics)[:3]
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys) or "nothing to measure"


def _summarize(workdir: Path, cfg, jobs, seed, flags, cache) -> list[str]:
    """Redraws each task's figures and tables from all its records when this sweep added
    records, or when the records changed (another shard) or a file is missing since the
    last drawing (WORKDIR/evals/.TASK.drawn)."""
    out = []
    for job in jobs:
        if job.task.summarize is None:
            continue
        recs = [r for r in rec_lib.read_all(job.directory) if r["status"] == "ok"]
        if not recs:
            continue
        marker = rec_lib.evals_dir(workdir) / f".{tasks_lib.slug(job.task.name)}.drawn"
        key = fileio.json_sha256([[r["step"], r["settings_sha256"],
                                   r["checkpoint"]["meta_sha256"]] for r in recs])
        last = fileio.read_json(marker) if marker.exists() else {}
        if job.new == 0 and last.get("records") == key and \
                all((marker.parent / f).exists() for f in last.get("files", ())):
            continue
        ctx = job.ctx or tasks_lib.Context(workdir, cfg, job.settings, seed, flags, cache,
                                           None, _run_tokenizer(workdir, cache))
        files = [Path(p) for p in job.task.summarize(recs, marker.parent, ctx)]
        fileio.write_json(marker, dict(records=key, files=[f.name for f in files]))
        out += [str(f) for f in files]
    return out
