"""Writes a release bundle of a run: `python -m crystal.release --workdir=W --out=R`: the
release checkpoints (full state), the data chunks between them, metrics, evals, config,
ledger, replay certificates, index.json/csv, README and MANIFEST.sha256 (docs/release.md).
"""

from crystal import cli
from crystal.release import bundle

FLAGS = (
    cli.Flag("workdir", "the run's directory", required=True),
    cli.Flag("out", "the bundle directory to write (must not exist)", required=True),
    cli.Flag("steps", "checkpoints to release: release (one per data chunk), all, or "
             "STEP,STEP,...", str, "release"),
    cli.Flag("hf", "Hugging Face export of: all released checkpoints, the final one, none",
             str, "final", choices=bundle.HF_CHOICES),
    cli.Flag("hf_layout", "HF layout: auto, llama, stablelm or llm360", str, "auto"),
    cli.Flag("replay_steps", "steps per replay certificate (0: none)", int, 2),
    cli.Flag("partial", "release an unfinished run (what exists)", bool, False),
)


def _main(a):
    out = bundle.write(a.workdir, a.out, a.steps, a.hf, a.hf_layout, a.partial,
                       a.replay_steps)
    print(f"wrote {out['out']}: bundle {out['bundle_id']}, {out['files']} files, "
          f"{len(out['checkpoints'])} checkpoints, {out['chunks']} data chunks, "
          f"{out['certificates']} replay certificates")
    for n in out["notes"]:
        print(f"note: {n}")


def main(argv=None):
    return cli.run(_main, doc=__doc__.split("\n\n")[0], flags=FLAGS, argv=argv,
                   prog="python -m crystal.release")


if __name__ == "__main__":
    raise SystemExit(main())
