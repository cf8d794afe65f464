"""Metric writers (real files), parameter counts, FLOPs/MFU, loss plot, memory."""
import importlib.util
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tb_reader import read_tensorboard_scalars

from crystal import metrics as M
from crystal.metrics import plots
from crystal.config import load


def test_jsonl_records_and_resume_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = M.JsonlWriter(path)
    assert isinstance(w, M.MetricWriter)
    for step in range(1, 6):
        w.write_scalars(step, {"loss": jnp.float32(10.0 / step), "stage": 1, "chunk": step // 3,
                               "lr": np.float64(1e-3)})
    w.write_scalars(5, {"eval/loss": 2.5})   # a second call at one step merges on read
    w.write_scalars(6, {"loss": float("nan"), "stage": 1, "chunk": 2})
    w.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 7
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["loss"] == 10.0 and first["stage"] == 1
    assert first["chunk"] == 0 and first["lr"] == 1e-3 and first["time"] > 0
    recs = M.read_jsonl(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[4]["eval/loss"] == 2.5 and recs[4]["loss"] == 2.0
    assert math.isnan(recs[5]["loss"])
    # Crash mid-line, then resume from the checkpoint at step 4: steps >= 4 go, and the
    # re-run appends with no duplicate steps.
    with open(path, "a") as f:
        f.write('{"step": 7, "lo')
    w = M.JsonlWriter(path, resume_step=4)
    assert [r["step"] for r in M.read_jsonl(path)] == [1, 2, 3]
    for step in range(4, 8):
        w.write_scalars(step, {"loss": 1.0 / step, "stage": 2, "chunk": 3})
    w.close()
    steps = [json.loads(l)["step"] for l in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert M.read_jsonl(path)[4]["stage"] == 2
    # A corrupt line in the middle is an error naming file:line.
    lines = path.read_text().splitlines()
    lines[1] = "not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(M.MetricsError, match=r"metrics.jsonl:2: bad metrics record"):
        M.JsonlWriter(path, resume_step=3)
    with pytest.raises(M.MetricsError, match="not a scalar"):
        M.JsonlWriter(tmp_path / "x.jsonl").write_scalars(1, {"v": np.ones(3)})


def test_tensorboard_event_file_readable(tmp_path):
    w = M.TensorBoardWriter(tmp_path / "tb")
    for step in range(3):
        w.write_scalars(step, {"loss": 3.0 - step, "grad_norm": jnp.float32(0.5)})
    w.write_texts(0, {"note": "hello"})
    w.close()
    got = read_tensorboard_scalars(tmp_path / "tb")
    assert got["loss"] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [v for _, v in got["grad_norm"]] == [0.5, 0.5, 0.5]
    # A flipped byte is caught by the record CRC.
    f = next((tmp_path / "tb").glob("events.out.tfevents.*"))
    b = bytearray(f.read_bytes())
    b[-6] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(M.MetricsError, match="corrupt event record"):
        read_tensorboard_scalars(tmp_path / "tb")


def test_create_writer_fan_out(tmp_path):
    cfg = load("amber_tiny")
    w = M.create_writer(cfg, tmp_path, process_index=0)
    w.write_scalars(1, {"loss": jnp.float32(5.0), "stage": 1, "chunk": 0})
    w.write_scalars(2, {"loss": 4.0, "stage": 1, "chunk": 0})
    w.flush()
    w.close()
    assert [r["loss"] for r in M.read_jsonl(tmp_path / "metrics.jsonl")] == [5.0, 4.0]
    assert read_tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 5.0), (2, 4.0)]
    # Resume at step 2 through the fan-out: JSONL drops step 2.
    w = M.create_writer(cfg, tmp_path, process_index=0, resume_step=2)
    w.close()
    assert [r["step"] for r in M.read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    # Other processes write nothing.
    other = tmp_path / "p1"
    w = M.create_writer(cfg, other, process_index=1)
    w.write_scalars(1, {"loss": 1.0})
    w.close()
    assert not other.exists()
    # W&B asked for but not installed: a one-line pointer to the extra.
    cfg.metrics.wandb = True
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(M.MetricsError, match=r"^metrics.wandb=True needs wandb: "
                           r"pip install crystal\[wandb\]$"):
            M.create_writer(cfg, tmp_path / "wb", process_index=0)
        assert not (tmp_path / "wb").exists()


def test_param_count_exact():
    assert M.param_count(load("amber_7b")) == 6_738_415_616          # llm360.md
    cc = load("crystalcoder_7b")
    assert M.param_count(cc) == 6_575_278_720                          # "about 6.58B"
    b = M.param_breakdown(cc)
    assert b["output_head"] == 0 and b["embedding"] == 32032 * 4096
    # Each bias / norm knob moves the count by exactly its shape.
    cfg = load("amber_tiny")
    d, f, L, V = 128, 344, 2, 2048
    base = M.param_count(cfg)
    assert base == 2 * V * d + L * (4 * d * d + 3 * d * f + 2 * d) + d
    cfg.model.qkv_bias = True
    assert M.param_count(cfg) == base + L * 3 * d
    cfg.model.tie_embeddings = True
    assert M.param_count(cfg) == base + L * 3 * d - V * d


def test_flops_and_mfu():
    cfg = load("amber_7b")
    n_matmul = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 32000 * 4096
    assert M.flops_per_token(cfg) == 6 * n_matmul + 12 * 32 * 4096 * 2048
    assert M.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert M.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert M.peak_flops_per_device("NVIDIA H200") == 989e12
    assert M.peak_flops_per_device("TPU v4") == 275e12
    assert M.peak_flops_per_device("TPU v5 lite") == 197e12
    assert M.peak_flops_per_device("TPU v5p") == 459e12
    with pytest.raises(M.MetricsError, match="peak_flops_per_device"):
        M.peak_flops_per_device("Mystery accelerator")
    # Perfect utilisation on 8 A100s is MFU 1.
    tps = 8 * 312e12 / M.flops_per_token(cfg)
    assert M.mfu(tps, cfg, 8, "NVIDIA A100-SXM4-80GB") == pytest.approx(1.0)
    cfg.metrics.peak_flops_per_device = 156e12
    assert M.mfu(tps, cfg, 8, "NVIDIA A100-SXM4-80GB") == pytest.approx(2.0)
    # CPU: measured once per process, a plausible number.
    cpu = M.peak_flops_per_device("cpu")
    assert 1e8 < cpu < 1e13 and M.peak_flops_per_device("cpu") == cpu


def test_plot_loss_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = M.JsonlWriter(path)
    for step in range(1, 41):
        stage = 1 if step <= 20 else 2
        w.write_scalars(step, {"loss": 8.0 / math.sqrt(step), "stage": stage, "chunk": step // 10,
                               "loss/starcoder.python": 7.0 / math.sqrt(step)})
    w.write_scalars(40, {"eval/loss": 1.5})
    w.close()
    png = plots.plot_loss(path, tmp_path / "plots" / "loss.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in png.parent.iterdir()) == ["loss.png"]   # no temp left
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(M.MetricsError, match="no 'loss' records"):
        plots.plot_loss(empty, tmp_path / "e.png")


def test_device_memory():
    mem = M.device_memory()
    if "bytes_in_use" in mem:      # accelerator
        assert mem["peak_bytes_in_use"] >= mem["bytes_in_use"] >= 0
    else:                          # CPU backend: host RSS
        before = mem["host_rss_bytes"]
        x = np.ones((64, 1024, 1024), np.uint8)   # 64 MiB, touched
        after = M.device_memory()
        assert after["host_rss_bytes"] >= before + 60 * 2 ** 20
        assert after["host_peak_rss_bytes"] >= after["host_rss_bytes"]
        del x
