"""Metrics: writers (`writers.py`: JSONL, TensorBoard, W&B), the FLOPs/parameter formula
and MFU (`flops.py`), device memory (`device.py`) and plots (`plots.py`, imported only
where a plot is drawn: it loads matplotlib)."""

from crystal.errors import MetricsError
from crystal.metrics.device import device_memory
from crystal.metrics.flops import (PEAK_FLOPS, flops_per_token, measured_cpu_flops, mfu,
                                   param_breakdown, param_count, peak_flops_per_device)
from crystal.metrics.writers import (AsyncMultiWriter, JsonlWriter, MetricWriter, MultiWriter,
                                     TensorBoardWriter, WandbWriter, create_writer, read_jsonl)

__all__ = ["AsyncMultiWriter", "JsonlWriter", "MetricWriter", "MetricsError", "MultiWriter",
           "PEAK_FLOPS", "TensorBoardWriter", "WandbWriter", "create_writer", "device_memory",
           "flops_per_token", "measured_cpu_flops", "mfu", "param_breakdown", "param_count",
           "peak_flops_per_device", "read_jsonl"]
