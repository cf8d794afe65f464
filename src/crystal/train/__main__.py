"""Trains a config through its stages: `python -m crystal.train [--stage=N]`. With no
--stage every remaining stage runs in order; --stage=N runs stage N alone (from stage N-1's
final checkpoint, or --init_from) and stops after its stage-final checkpoint. The same
command after an interruption continues bit-exactly from the last checkpoint.
"""

from pathlib import Path

from crystal import cli
from crystal import sharding as sharding_lib
from crystal.train import loop

FLAGS = (
    cli.Flag("workdir", "run directory (default: runs/<config name>)"),
    cli.Flag("stage", "run stage N alone (from stage N-1's final checkpoint or --init_from); "
             "default: the config's train.stage (0: every remaining stage)", int),
    cli.Flag("init_from", "checkpoint to start from when the workdir has none: WORKDIR, "
             "WORKDIR/checkpoints or WORKDIR/checkpoints/STEP"),
    cli.Flag("stop_after_steps", "checkpoint and stop after N steps", int),
) + sharding_lib.distributed.FLAGS


def _main(a):
    sharding_lib.initialize(sharding_lib.settings_from_args(a))
    cfg = a.cfg
    workdir = a.workdir or str(Path("runs") / cfg.name)
    out = loop.run(cfg, workdir, stage=a.stage, init_from=a.init_from,
                   stop_after_steps=a.stop_after_steps)
    if out.get("preempted"):
        return 0
    if out["start"]["kind"] == "complete":
        what = f"stage {a.stage}" if a.stage else "every stage"
        print(f"crystal.train: {workdir}: {what} complete (step {out['final_step']}); "
              "nothing to do", flush=True)
        return 0
    print(f"crystal.train: done at step {out['final_step']}\n"
          f"  checkpoints {out['checkpoints']}\n  metrics     {out['metrics']}\n"
          f"  plot        {out['plot']}", flush=True)
    return 0


def main(argv=None):
    return cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_REQUIRED,
            argv=argv, prog="python -m crystal.train")


if __name__ == "__main__":
    raise SystemExit(main())
