"""Metric writers: clu MetricWriters for JSONL (always), TensorBoard and W&B.

A run's metrics live next to its checkpoints (LLM360 published every logged metric, lined up
with checkpoints and data chunks by step):

    WORKDIR/metrics.jsonl      always; one JSON object per line: {"step", "time", scalars...}
    WORKDIR/tensorboard/       tensorboardX event files (metrics.tensorboard)
    WORKDIR/wandb/             W&B offline run (metrics.wandb; needs `pip install crystal[wandb]`)

Every record carries `step`, `stage` and `chunk`: the caller passes stage and chunk as scalars.
Non-finite values are kept as JSON's NaN / Infinity tokens (what Python's json reads), since
a NaN loss is exactly what a transparent log must show.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import clu
import jax
import numpy as np
from tensorboardX import SummaryWriter

from crystal import fileio
from crystal.config import to_json_dict
from crystal.errors import MetricsError


def _clu_writers() -> types.ModuleType:
    """clu.metric_writers, importable without TensorFlow.

    clu 0.0.12's package __init__ imports its TF SummaryWriter (google/CommonLoopUtils#358),
    but interface, multi_writer, async_writer and logging_writer need no TF. Without TF we
    register the package module without running its __init__ and import only those.
    """
    try:
        from clu import metric_writers   # needs TensorFlow; the fallback below does not
        return metric_writers
    except ImportError:
        pass
    name = "clu.metric_writers"
    pkg_dir = Path(importlib.util.find_spec("clu").submodule_search_locations[0])
    pkg = types.ModuleType(name, "clu.metric_writers without the TensorFlow SummaryWriter")
    pkg.__path__ = [str(pkg_dir / "metric_writers")]
    pkg.__package__ = name
    sys.modules[name] = pkg
    clu.metric_writers = pkg
    # only now: the package above is registered, so its TF __init__ does not run
    from clu.metric_writers import async_writer, interface, logging_writer, multi_writer
    pkg.interface, pkg.async_writer = interface, async_writer
    pkg.logging_writer, pkg.multi_writer = logging_writer, multi_writer
    pkg.MetricWriter, pkg.MultiWriter = interface.MetricWriter, multi_writer.MultiWriter
    pkg.AsyncWriter, pkg.AsyncMultiWriter = async_writer.AsyncWriter, async_writer.AsyncMultiWriter
    pkg.ensure_flushes = async_writer.ensure_flushes
    pkg.LoggingWriter = logging_writer.LoggingWriter

    def missing(attr):
        raise AttributeError(f"clu.metric_writers.{attr} needs TensorFlow, which is not "
                             "installed (crystal loaded clu's TF-free writers only)")
    pkg.__getattr__ = missing
    return pkg


metric_writers = _clu_writers()
MetricWriter = metric_writers.MetricWriter
MultiWriter = metric_writers.MultiWriter
AsyncMultiWriter = metric_writers.AsyncMultiWriter




def _scalar(v):
    """A Python number from a Python/numpy/jax scalar (syncs a device array)."""
    a = np.asarray(v)
    if a.size != 1:
        raise MetricsError(f"metric value of shape {a.shape} is not a scalar")
    x = a.reshape(()).item()
    return x if isinstance(x, (int, float, bool)) else float(x)


class _ScalarsOnly(MetricWriter):
    """Base for writers that record scalars (and text / hparams where they can)."""

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass


# ----------------------------------------------------------------------------- JSONL


def read_jsonl(path) -> list[dict]:
    """The records of a metrics.jsonl, one per step in file order.

    Lines of the same step (several write_scalars calls) are merged. An unparsable last line
    (a crash mid-write) is dropped; an unparsable line elsewhere is an error naming file:line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    by_step: dict[int, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines) - 1:
                break
            raise MetricsError(f"{path}:{i + 1}: bad metrics record ({e})") from e
        by_step.setdefault(step, {}).update(rec)
    return list(by_step.values())


class JsonlWriter(_ScalarsOnly):
    """Appends one JSON line per write_scalars call: {"step", "time", **scalars}.

    `resume_step`: records with step >= resume_step (written after the checkpoint the run
    resumes from) are dropped first, by rewriting the file atomically, so the file never
    holds two histories of one step. Each line is flushed as it is written: a crash loses
    nothing already logged.
    """

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._truncate(resume_step)
        self._f = open(self.path, "a", encoding="utf-8")

    def _truncate(self, resume_step):
        lines = self.path.read_text().splitlines()
        keep = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError) as e:
                if i == len(lines) - 1:   # a line cut by a crash
                    break
                raise MetricsError(f"{self.path}:{i + 1}: bad metrics record ({e})") from e
            if resume_step is None or step < resume_step:
                keep.append(line)
        if len(keep) == len(lines):
            return
        with fileio.atomic_open(self.path, "w") as f:
            f.write("".join(l + "\n" for l in keep))

    def write_scalars(self, step, scalars):
        rec = {"step": int(step), "time": round(time.time(), 3)}
        rec.update((str(k), _scalar(v)) for k, v in scalars.items())
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def flush(self):
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        if not self._f.closed:
            self.flush()
            self._f.close()


# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardWriter(_ScalarsOnly):
    """tensorboardX event files (clu's own TB writer needs TensorFlow).

    `resume_step` becomes tensorboardX's purge_step: TensorBoard hides events at steps
    >= it from the earlier, crashed attempt.
    """

    def __init__(self, logdir, resume_step: int | None = None):
        self.logdir = str(logdir)
        self._w = SummaryWriter(logdir=self.logdir, purge_step=resume_step, flush_secs=30)

    def write_scalars(self, step, scalars):
        for k, v in scalars.items():
            self._w.add_scalar(str(k), _scalar(v), global_step=int(step))

    def write_texts(self, step, texts):
        for k, v in texts.items():
            self._w.add_text(str(k), str(v), global_step=int(step))

    def write_histograms(self, step, arrays, num_buckets=None):
        for k, v in arrays.items():
            bins = (num_buckets or {}).get(k)
            self._w.add_histogram(str(k), np.asarray(v), global_step=int(step), bins="auto",
                                  max_bins=bins)

    def write_hparams(self, hparams):
        self._w.add_text("hparams", "\n".join(f"    {k} = {v!r}" for k, v in
                                               sorted(hparams.items())), global_step=0)

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


# ----------------------------------------------------------------------------- W&B


class WandbWriter(_ScalarsOnly):
    """Weights & Biases, imported lazily (optional dependency), offline by default."""

    def __init__(self, cfg, workdir):
        try:
            import wandb   # optional: the wandb extra
        except ImportError:
            raise MetricsError("metrics.wandb=True needs wandb: pip install crystal[wandb]") \
                from None
        (Path(workdir) / "wandb").mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=cfg.metrics.wandb_project, mode=cfg.metrics.wandb_mode,
                               dir=str(workdir), name=cfg.name, config=to_json_dict(cfg))

    def write_scalars(self, step, scalars):
        self._run.log({str(k): _scalar(v) for k, v in scalars.items()}, step=int(step))

    def write_hparams(self, hparams):
        self._run.config.update(dict(hparams), allow_val_change=True)

    def flush(self):
        pass

    def close(self):
        self._run.finish()


def create_writer(cfg, workdir, process_index: int | None = None,
                  resume_step: int | None = None) -> MetricWriter:
    """The run's MetricWriter: JSONL always, TensorBoard / W&B as configured.

    Only process 0 writes; other processes get a writer that drops everything. Writes run in
    a background thread (clu AsyncMultiWriter), so reading device scalars never stalls the
    train step; call `flush()` before a checkpoint or exit. `resume_step`: drop (JSONL) or
    hide (TensorBoard) what an earlier attempt logged at steps >= it.
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_index != 0:
        return MultiWriter([])
    workdir = Path(workdir)
    writers: list[MetricWriter] = []
    if cfg.metrics.wandb:   # first: a missing wandb fails before any file is touched
        writers.append(WandbWriter(cfg, workdir))
    writers.append(JsonlWriter(workdir / "metrics.jsonl", resume_step))
    if cfg.metrics.tensorboard:
        writers.append(TensorBoardWriter(workdir / "tensorboard", resume_step))
    return AsyncMultiWriter(writers)
