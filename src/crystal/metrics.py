"""Metrics: clu MetricWriters (JSONL, TensorBoard, W&B), FLOPs/MFU, loss plots, memory.

A run's metrics live next to its checkpoints (LLM360 published every logged metric, lined up
with checkpoints and data chunks by step):

    WORKDIR/metrics.jsonl      always; one JSON object per line: {"step", "time", scalars...}
    WORKDIR/tensorboard/       tensorboardX event files (metrics.tensorboard)
    WORKDIR/wandb/             W&B offline run (metrics.wandb; needs `pip install crystal[wandb]`)
    WORKDIR/loss.png           plot_loss(WORKDIR/metrics.jsonl, ...)

Every record carries `step`, `stage` and `chunk`: the caller passes stage and chunk as scalars.
Non-finite values are kept as JSON's NaN / Infinity tokens (what Python's json reads), since
a NaN loss is exactly what a transparent log must show.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import struct
import sys
import time
import types
from pathlib import Path
import numpy as np

from crystal import fileio
from crystal.errors import MetricsError


def _clu_writers() -> types.ModuleType:
    """clu.metric_writers, importable without TensorFlow.

    clu 0.0.12's package __init__ imports its TF SummaryWriter (google/CommonLoopUtils#358),
    but interface, multi_writer, async_writer and logging_writer need no TF. Without TF we
    register the package module without running its __init__ and import only those.
    """
    try:
        from clu import metric_writers
        return metric_writers
    except ImportError:
        pass
    name = "clu.metric_writers"
    pkg_dir = Path(importlib.util.find_spec("clu").submodule_search_locations[0])
    pkg = types.ModuleType(name, "clu.metric_writers without the TensorFlow SummaryWriter")
    pkg.__path__ = [str(pkg_dir / "metric_writers")]
    pkg.__package__ = name
    sys.modules[name] = pkg
    import clu
    clu.metric_writers = pkg
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
        from tensorboardX import SummaryWriter
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


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under `logdir`: tag -> [(step, value)], CRCs checked.

    Reads the TFRecord framing directly with tensorboardX's protos, so no TensorFlow or
    TensorBoard install is needed.
    """
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        buf = f.read_bytes()
        pos = 0
        while pos + 12 <= len(buf):
            header = buf[pos:pos + 8]
            (n,) = struct.unpack("Q", header)
            (hcrc,) = struct.unpack("I", buf[pos + 8:pos + 12])
            data = buf[pos + 12:pos + 12 + n]
            (dcrc,) = struct.unpack("I", buf[pos + 12 + n:pos + 16 + n])
            if hcrc != masked_crc32c(header) or dcrc != masked_crc32c(data):
                raise MetricsError(f"{f}: corrupt event record at byte {pos}")
            pos += 16 + n
            ev = event_pb2.Event.FromString(data)
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


# ----------------------------------------------------------------------------- W&B


class WandbWriter(_ScalarsOnly):
    """Weights & Biases, imported lazily (optional dependency), offline by default."""

    def __init__(self, cfg, workdir):
        try:
            import wandb
        except ImportError:
            raise MetricsError("metrics.wandb=True needs wandb: pip install crystal[wandb]") \
                from None
        from crystal.config import to_json_dict
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
        import jax
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


# ----------------------------------------------------------------------------- FLOPs, MFU


def param_breakdown(cfg) -> dict[str, int]:
    """Exact parameter counts from the config's shapes (crystal/model.py's layout).

    Per layer: q, k, v, o (d x d each; + d each with qkv_bias / out_bias), a SwiGLU FFN
    (gate, up: d x f; down: f x d; + f, f, d with ffn_bias), two norms (d scale, + d bias
    with norm_bias); then a final norm, the input embedding (V x d) and an output head
    (V x d, no bias) unless tie_embeddings.
    """
    m = cfg.model
    d, f, V, L = m.d_model, m.ffn_dim, m.vocab_size, m.num_layers
    norm = d * (2 if m.norm_bias else 1)
    attn = 4 * d * d + (3 * d if m.qkv_bias else 0) + (d if m.out_bias else 0)
    ffn = 3 * d * f + ((2 * f + d) if m.ffn_bias else 0)
    embed = V * d
    head = 0 if m.tie_embeddings else V * d
    layers = L * (attn + ffn + 2 * norm)
    total = embed + head + layers + norm
    return dict(
        total=total,
        embedding=embed,
        output_head=head,
        layers=layers,
        non_embedding=total - embed,
        # weights used in matmuls: the projections and the logit matmul (the tied embedding
        # is one), not the embedding lookup, norms or biases
        matmul=L * (4 * d * d + 3 * d * f) + V * d,
    )


def param_count(cfg) -> int:
    """Total parameters (Amber 7B: 6,738,415,616; CrystalCoder 7B: 6,575,278,720)."""
    return param_breakdown(cfg)["total"]


def flops_per_token(cfg) -> float:
    """Training FLOPs per token, the one definition crystal uses (info, MFU).

        flops_per_token = 6 * N_matmul + 12 * num_layers * d_model * seq_len

    N_matmul counts every weight used in a matrix multiply: the attention and FFN
    projections and the output/logit matmul (V x d; the tied embedding counts once, as the
    logit matmul), not the embedding lookup, norms or biases. 6 = 2 FLOPs per multiply-add
    x (forward + 2x backward). The second term is attention's QK^T and AV matmuls at
    sequence length T = data.seq_len, counted without the causal half (the PaLM appendix B
    / Chinchilla convention). Activation recomputation (remat) is not counted: this is
    model FLOPs, so MFU stays comparable across remat policies.
    """
    m = cfg.model
    return 6.0 * param_breakdown(cfg)["matmul"] + 12.0 * m.num_layers * m.d_model * cfg.data.seq_len


# Dense bf16 peak FLOP/s per device (no 2:4 sparsity), from vendor data sheets:
# NVIDIA A100 data sheet (312 TFLOPS BF16 Tensor Core), H100 SXM data sheet (989 TFLOPS
# dense BF16; 1979 with sparsity; PCIe card 756), H200 SXM (same compute as H100: 989); Google
# Cloud TPU system-architecture pages: v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOPS bf16.
# Keys are matched as lower-case substrings of jax's device_kind, most specific first.
PEAK_FLOPS = (
    ("a100", 312e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),       # jax names v5p "TPU v5"
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
)


@functools.cache
def measured_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one float32 n x n matmul under XLA on the first CPU device, best of
    `repeats` (cached per process). CPUs have no data-sheet number that fits XLA's code."""
    import jax
    import jax.numpy as jnp
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
    """Peak FLOP/s of one device: `override` (metrics.peak_flops_per_device) if > 0, the
    PEAK_FLOPS table for GPUs/TPUs, a runtime measurement for CPUs."""
    if override and override > 0:
        return float(override)
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    if kind == "cpu" or "cpu" in kind:
        return measured_cpu_flops()
    raise MetricsError(f"device kind {device_kind!r}: no peak FLOP/s known; set "
                       "metrics.peak_flops_per_device")


def mfu(tokens_per_s: float, cfg, num_devices: int, device_kind: str) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    override = cfg.metrics.get("peak_flops_per_device", 0.0)
    peak = peak_flops_per_device(device_kind, override)
    return tokens_per_s * flops_per_token(cfg) / (num_devices * peak)


# ----------------------------------------------------------------------------- memory


def device_memory() -> dict[str, int]:
    """Memory in use / peak: the first local device's allocator stats where it has them
    (GPU, TPU), else this process's host RSS (CPU backend)."""
    import jax
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_in_use" in stats:
        out = dict(bytes_in_use=int(stats["bytes_in_use"]),
                   peak_bytes_in_use=int(stats.get("peak_bytes_in_use", stats["bytes_in_use"])))
        if "bytes_limit" in stats:
            out["bytes_limit"] = int(stats["bytes_limit"])
        return out
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024   # bytes on macOS, KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = peak
    return dict(host_rss_bytes=rss, host_peak_rss_bytes=max(peak, rss))


# ----------------------------------------------------------------------------- plots


def _is_loss_key(k: str) -> bool:
    return k == "loss" or k.startswith("loss/") or (k.startswith("eval/") and "loss" in k)


def plot_loss(jsonl_path, png_path) -> Path:
    """A loss-curve PNG from metrics.jsonl, stage boundaries (where `stage` changes) marked.

    Left: the training loss and the mean eval loss. Right: eval loss per source, one line
    per data group (per-step per-source training losses are too noisy to read at a glance;
    they stay in the JSONL and TensorBoard). Written to a temp file and renamed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_jsonl(jsonl_path)
    if not any("loss" in r for r in recs):
        raise MetricsError(f"{jsonl_path}: no 'loss' records to plot")
    keys = {k for r in recs for k in r if _is_loss_key(k)}
    main = [k for k in ("loss", "eval/loss") if k in keys]
    per_source = sorted(k for k in keys if k.startswith("eval/") and k != "eval/loss")
    fig, axes = plt.subplots(1, 2 if per_source else 1, figsize=(13 if per_source else 8, 4.8),
                             dpi=100, squeeze=False)
    for ax, ks in zip(axes[0], (main, per_source)):
        for k in ks:
            pts = [(r["step"], r[k]) for r in recs if k in r and r[k] is not None
                   and math.isfinite(r[k])]
            if pts:
                xs, ys = zip(*pts)
                label = k.removeprefix("eval/").removesuffix("/loss") if ks is per_source else k
                ax.plot(xs, ys, label=label, lw=1.6 if k == "loss" else 0.9,
                        marker="o" if k.startswith("eval/") else None, ms=3)
        prev = None
        for r in recs:
            s = r.get("stage")
            if s is not None and prev is not None and s != prev:
                ax.axvline(r["step"], color="gray", ls="--", lw=0.8)
                ax.annotate(f"stage {s:g}", (r["step"], 1.0),
                            xycoords=("data", "axes fraction"), xytext=(3, -12),
                            textcoords="offset points", fontsize=8, color="gray")
            prev = s if s is not None else prev
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][0].set_title(f"{Path(jsonl_path).parent.name or 'run'}: training and eval loss")
    axes[0][0].legend(fontsize=8)
    if per_source:
        axes[0][1].set_title("eval loss per source")
        axes[0][1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    png_path = Path(png_path)
    with fileio.atomic_open(png_path) as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)
    return png_path
