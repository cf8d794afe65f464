"""Evaluates a run's checkpoints: one record per (checkpoint, task) under WORKDIR/evals/.

    python -m crystal.eval --workdir=W --tasks=perplexity,memorization
        [--checkpoints=release|all|STEP,...] [--shard=I/N] [--seed=0]
        [--settings=memorization.sequences_per_chunk=200,...] [--mesh=data=2,tensor=2]

Idempotent and resumable: a record that exists for the same checkpoint, settings and seed
is not computed again, so a second invocation does nothing and a killed one, re-run,
completes. --shard=I/N evaluates checkpoints I, I+N, ... (N hosts share a sweep with no
coordination). Results also go to the run's metrics (evals/TASK/NAME at the checkpoint's
step) and the figures WORKDIR/evals/*.png are redrawn. Tasks: crystal.eval.tasks.
"""

from __future__ import annotations

from crystal import cli
from crystal import sharding as sharding_lib
from crystal.data import replay
from crystal.eval import sweep, tasks

FLAGS = (
    cli.Flag("workdir", "the run's directory (checkpoints/, data/, run.json)", required=True),
    cli.Flag("tasks", f"tasks to run ({', '.join(tasks.names())})", list,
             ["perplexity", "memorization"]),
    cli.Flag("checkpoints", "release (every data-chunk release), all, or steps STEP,STEP",
             str, "release"),
    cli.Flag("shard", "I/N: this host's share of the checkpoints", str, "0/1"),
    cli.Flag("seed", "seed of every random choice (memorization's samples, sampling)", int,
             0),
    cli.Flag("settings", "task settings TASK.FIELD=VALUE, comma-separated", list, []),
    cli.Flag("allow_code_execution", "let tasks run model-generated code (in a sandbox)",
             bool, False),
    cli.Flag("mesh", "data=D,fsdp=F,tensor=T: params and decoding on a device mesh "
             "(default: one device)", str, ""),
    cli.Flag("figures", "redraw the figures WORKDIR/evals/*.png at the end", bool, True),
    cli.Flag("progress", "a progress bar on a terminal", bool, True),
)


def main(argv=None):
    def body(a):
        shard = sweep.parse_shard(a.shard)
        mesh = sharding_lib.mesh_from_flag(replay.run_config(a.workdir), a.mesh) \
            if a.mesh else None
        r = sweep.sweep(a.workdir, a.tasks, a.checkpoints, shard, a.seed, a.settings,
                        dict(allow_code_execution=a.allow_code_execution), mesh, a.progress,
                        a.figures)
        what = "nothing to do" if not r["evaluated"] else f"{r['evaluated']} evaluated"
        print(f"crystal.eval: {what}, {r['skipped']} already done over "
              f"{len(r['checkpoints'])} checkpoints (shard {shard[0]}/{shard[1]}); records "
              f"in {a.workdir}/evals" + (f"; drew {len(r['figures'])} figures/tables"
                                         if r["figures"] else ""))
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=FLAGS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
