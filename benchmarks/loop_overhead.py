"""The training loop's step time against the bare jitted step's, same config, same run.

    python benchmarks/loop_overhead.py [--config=configs/crystalcoder_tiny.py] [--steps=60]
        [--config.X=V ...]

The loop (crystal.train.run: loader, sharded step, metrics read one step late, checkpoint
policy, progress) trains --steps steps of stage 1 in a fresh workdir, and its metrics give
the median `step_time` of the second half; the bare step is the same sharded train step
called in a tight loop on one batch from the same data, timed the same way. The ratio
loop/bare is what the host costs per step: near 1.0, the host never makes the device wait.
Periodic checkpoints, evals and plots are off, so both figures are the steady-state step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import jax

from crystal import cli, metrics, optim
from crystal import config as config_lib
from crystal import sharding as sharding_lib
from crystal import train
from crystal.data import loader as loader_lib

FLAGS = (cli.Flag("steps", "steps each side runs (medians are over the second half)", int,
                  60),)
QUIET = {"checkpoint.every_steps": 0, "checkpoint.release_per_chunk": False,
         "metrics.tensorboard": False, "metrics.plot": False, "train.progress": False,
         "train.eval_batches": 0}


def loop_step_times(cfg, wd: Path, steps: int) -> list[float]:
    train.run(cfg, wd, stage=1, stop_after_steps=steps)
    recs = [r for r in metrics.read_jsonl(wd / "metrics.jsonl") if "step_time" in r]
    return [r["step_time"] for r in recs[len(recs) // 2:]]


def bare_step_times(cfg, wd: Path, steps: int) -> list[float]:
    """train.make_train_step sharded as the loop shards it, on the workdir's first batch."""
    loader = loader_lib.StageLoader(cfg, wd, 1)
    batch = {k: v for k, v in next(loader).items() if k in train.STEP_KEYS}
    loader.close()
    batch["poison"] = jax.numpy.zeros(batch["inputs"].shape[0], jax.numpy.float32)
    mesh = sharding_lib.make_mesh(cfg, jax.devices()[:1])
    opt = optim.make_optimizer(cfg, 1)
    shardings = sharding_lib.state_shardings(train.abstract_state(cfg, opt), cfg, mesh)
    n_src = len(loader.group_names)
    step = sharding_lib.shard_train_step(train.make_train_step(cfg, opt, n_src), cfg, mesh,
                                         shardings)
    state, _ = sharding_lib.create_sharded_state(lambda k: train.init_state(cfg, k, opt), cfg,
                                                 mesh, jax.random.key(0))
    dev = sharding_lib.global_batch(batch, sharding_lib.batch_sharding(cfg, mesh),
                                    int(cfg.train.global_batch_size))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, dev)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    return times[len(times) // 2:]


def _main(a):
    cfg = config_lib.with_overrides(a.cfg, QUIET)
    with tempfile.TemporaryDirectory(prefix="crystal_loop_bench_") as wd:
        loop = statistics.median(loop_step_times(cfg, Path(wd), a.steps))
        bare = statistics.median(bare_step_times(cfg, Path(wd), a.steps))
    print(f"config {cfg.name}: batch {cfg.train.global_batch_size} x {cfg.data.seq_len}, "
          f"{jax.devices()[0].device_kind}")
    print(f"bare jitted step {bare * 1e3:8.2f} ms   training loop {loop * 1e3:8.2f} ms "
          f"(medians of the last {a.steps - a.steps // 2} steps)")
    print(f"ratio loop/bare={loop / bare:.3f}")


def main(argv=None):
    return cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS, argv=argv,
                   config=cli.CONFIG_REQUIRED, prog="python benchmarks/loop_overhead.py")


if __name__ == "__main__":
    raise SystemExit(main())
