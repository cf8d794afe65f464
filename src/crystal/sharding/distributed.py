"""Multi-host start-up: whether and how this process calls `jax.distributed.initialize`.

First match wins:

1. `--distributed=off`: one process.
2. Flags `--coordinator_address`, `--num_processes`, `--process_id` (all three, or none).
3. `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (all three).
4. A cluster JAX detects itself: Slurm with more than one task (`SLURM_JOB_ID`,
   `SLURM_NTASKS` > 1) or a Cloud TPU VM. `jax.distributed.initialize()` is called with no
   arguments and JAX's own cluster code reads the coordinator, process count and id from the
   scheduler. Under Slurm JAX runs one process per GPU (local devices [SLURM_LOCALID]):
   launch `srun --ntasks-per-node=<GPUs per node>`, or pass `--local_device_ids=0,...,7` for
   one task per node.
5. One process.

Why hand (4) to JAX: its cluster detection follows the schedulers' conventions (Slurm's
hostlist syntax and port choice, TPU metadata), which crystal should not re-implement.
CPU collectives use gloo, so multi-host runs (and their tests) work on CPU hosts too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax

from crystal import cli
from crystal.errors import ShardingError

FLAGS = (
    cli.Flag("distributed", "auto: flags, then JAX_* env, then the cluster JAX detects "
             "(Slurm, TPU VM); off: one process", str, "auto", choices=("auto", "off")),
    cli.Flag("coordinator_address", "HOST:PORT of process 0"),
    cli.Flag("num_processes", "number of processes (hosts)", int),
    cli.Flag("process_id", "this process's id in [0, num_processes)", int),
    cli.Flag("local_device_ids", "comma-separated local devices to use"),
)
FLAG_NAMES = tuple(f.name for f in FLAGS)
TPU_VM_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_NAME")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How (and whether) to call jax.distributed.initialize; `source` says who decided.

    mode: 'single' (one process, no initialize), 'explicit' (address/count/id known),
    'auto' (initialize() with no arguments: JAX's own cluster detection).
    """
    mode: str
    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int(value, what: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ShardingError(f"{what}: expected an integer, got {value!r}") from None


def distributed_settings(flags: Mapping[str, Any] | None = None,
                         environ: Mapping[str, str] | None = None) -> DistributedSettings:
    """Decides the multi-host settings (module docstring: first match wins)."""
    flags = dict(flags or {})
    env = os.environ if environ is None else environ
    mode = flags.get("distributed") or "auto"
    if mode not in ("auto", "off"):
        raise ShardingError(f"--distributed: expected 'auto' or 'off', got {mode!r}")
    if mode == "off":
        return DistributedSettings("single", "flags")
    ids = flags.get("local_device_ids")
    local_ids = tuple(_int(x, "--local_device_ids") for x in str(ids).split(",")) \
        if ids not in (None, "") else None
    for source, keys in (("flags", ("coordinator_address", "num_processes", "process_id")),
                         ("env", ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                  "JAX_PROCESS_ID"))):
        values = flags if source == "flags" else env
        given = [values.get(k) not in (None, "") for k in keys]
        if any(given):
            if not all(given):
                missing = [("--" if source == "flags" else "") + k
                           for k, g in zip(keys, given) if not g]
                raise ShardingError(f"distributed {source}: also set {', '.join(missing)}")
            return _explicit(source, values[keys[0]], _int(values[keys[1]], keys[1]),
                             _int(values[keys[2]], keys[2]), local_ids)
    if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        return DistributedSettings("auto", "slurm", local_device_ids=local_ids)
    if any(env.get(k) for k in TPU_VM_ENV):
        return DistributedSettings("auto", "tpu_vm", local_device_ids=local_ids)
    return DistributedSettings("single", "default")


def _explicit(source, address, n, pid, local_ids) -> DistributedSettings:
    if ":" not in str(address):
        raise ShardingError(f"{source}: coordinator address {address!r} needs HOST:PORT")
    if n <= 0 or not (0 <= pid < n):
        raise ShardingError(f"{source}: process id {pid} is not in [0, {n})")
    if n == 1:
        return DistributedSettings("single", source)
    return DistributedSettings("explicit", source, str(address), n, pid, local_ids)


def initialize(settings: DistributedSettings) -> DistributedSettings:
    """Starts JAX's multi-controller runtime as `settings` say (CPU collectives: gloo).

    Call before anything touches devices."""
    if settings.mode == "single":
        return settings
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    ids = list(settings.local_device_ids) if settings.local_device_ids is not None else None
    if settings.mode == "auto":
        jax.distributed.initialize(local_device_ids=ids)
    else:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes, process_id=settings.process_id,
            local_device_ids=ids)
    return settings


def settings_from_args(args) -> DistributedSettings:
    """The settings of a CLI's parsed FLAGS."""
    return distributed_settings({k: getattr(args, k) for k in FLAG_NAMES})
