"""How long a checkpoint blocks the training loop: async save against sync save, and restore.

    python benchmarks/checkpoint_save.py [--d_model=512] [--layers=9] [--rounds=3] [--dir=TMP]

The state is crystal's full train state (float32 params and both Adam moments, a 30.6M-
parameter Amber-shaped model by default: about 370 MB) saved by crystal.checkpoint's
Checkpointer exactly as the loop saves it (params, optimizer state, data state, meta).
Each round times, on fresh directories:

    sync save     Checkpointer(async_save=False).save(): the loop waits for all of it
    async save    Checkpointer(async_save=True).save(): what the loop waits for (the arrays
                  copied off the device); the write continues in the background
    async commit  the rest, until the checkpoint is committed on disk (wait())
    restore       Checkpointer.restore() into the state's shapes and shardings

and prints the best of --rounds for each, then `ratio async_block/sync=X.XX` (goal < 0.10:
an async save blocks the loop for under a tenth of a synchronous one's time).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import host
import jax

from crystal import checkpoint as ckpt_lib
from crystal import cli, config, model, optim, train

FLAGS = (
    cli.Flag("d_model", "width of the saved model", int, 512),
    cli.Flag("layers", "layers of the saved model", int, 9),
    cli.Flag("rounds", "timing rounds (best of)", int, 3),
    cli.Flag("dir", "where to write ('' = a temp dir, removed after)", str, ""),
)


def _state(cfg):
    opt = optim.make_optimizer(cfg, 1)
    state = jax.jit(lambda k: train.init_state(cfg, k, opt))(jax.random.key(0))
    return jax.block_until_ready(state), train.abstract_state(cfg, opt)


def _save(root: Path, state, async_save: bool) -> tuple[float, float]:
    """(seconds save() blocked, seconds until committed)."""
    with ckpt_lib.Checkpointer(root, async_save=async_save) as c:
        t = time.perf_counter()
        c.save(1, state.to_dict(), {"stage_step": 1}, {"bench": True})
        blocked = time.perf_counter() - t
        c.wait()
        return blocked, time.perf_counter() - t


def _restore(root: Path, abstract) -> float:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        abstract.to_dict())
    with ckpt_lib.Checkpointer(root, read_only=True) as c:
        t = time.perf_counter()
        state, _, _ = c.restore(1, target)
        jax.block_until_ready(state)
        return time.perf_counter() - t


def _main(a):
    cfg = config.load("amber_tiny", {"model.d_model": a.d_model, "model.num_layers": a.layers,
                                     "model.ffn_dim": a.d_model * 43 // 16,
                                     "model.num_heads": max(1, a.d_model // 64),
                                     "model.vocab_size": 2048})
    state, abstract = _state(cfg)
    mb = sum(x.nbytes for x in jax.tree.leaves(state.to_dict())) / 2**20
    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="ckpt_bench_"))
    best = dict(sync=float("inf"), block=float("inf"), commit=float("inf"),
                restore=float("inf"))
    try:
        for r in range(a.rounds):
            _, sync = _save(base / f"sync{r}", state, async_save=False)
            block, commit = _save(base / f"async{r}", state, async_save=True)
            restore = _restore(base / f"async{r}", abstract)
            for k, v in (("sync", sync), ("block", block), ("commit", commit),
                         ("restore", restore)):
                best[k] = min(best[k], v)
            shutil.rmtree(base / f"sync{r}")
            shutil.rmtree(base / f"async{r}")
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(f"host: {host.cpu()}; state {model.param_count(state.params):,} params, "
          f"{mb:.0f} MB (params + Adam moments), best of {a.rounds}")
    print(f"sync save      {best['sync'] * 1e3:8.1f} ms  (the loop waits for all of it)")
    print(f"async save     {best['block'] * 1e3:8.1f} ms  (the loop waits for this)")
    print(f"async commit   {best['commit'] * 1e3:8.1f} ms  (until on disk, in the background)")
    print(f"restore        {best['restore'] * 1e3:8.1f} ms  ({mb / best['restore']:.0f} MB/s)")
    print(f"ratio async_block/sync={best['block'] / best['sync']:.3f}")


if __name__ == "__main__":
    raise SystemExit(cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS,
                             config=cli.CONFIG_NONE))
