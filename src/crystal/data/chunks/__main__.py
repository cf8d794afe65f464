"""Writes LLM360-style data chunks: the rows each chunk of training steps trained on.

    python -m crystal.data.chunks --workdir=W [--stage=S] (--chunk=K | --all) --out=DIR

`--chunk=K` is the chunk's number within stage S when --stage is given, across the run
otherwise; `--all` writes every chunk (of stage S, or of the run). DIR must not exist; it
gets `train_NNNNN.jsonl` per chunk (JSON lines: token_ids, source, loss mask, step, position,
shard and row, FIM, document spans), `chunks.json` (sha256, steps, tokens per source of
each) and `tokenizer.model` (docs/data_format.md). The config is the run's (as replay's:
--config, else WORKDIR/run.json, else the one preparation logged). Read it back, to continue
pre-training on released data: `python -m crystal.data.prepare --input=DIR`.
"""

from __future__ import annotations

from crystal import cli
from crystal.data import replay
from crystal.data.chunks import export, numbering
from crystal.errors import UsageError

FLAGS = (
    cli.Flag("workdir", "run folder holding data/manifest.json", required=True),
    cli.Flag("out", "new folder to write the chunks to (must not exist)", required=True),
    cli.Flag("stage", "only this stage (1-based); --chunk then counts within it", int),
    cli.Flag("chunk", "the data chunk to write", int),
    cli.Flag("all", "write every data chunk (of --stage, or of the run)", bool, False),
    cli.Flag("workers", "processes writing chunks (default: data.workers)", int),
)


def main(argv=None):
    def body(a):
        if (a.chunk is None) == (not a.all):
            raise UsageError("pass exactly one of --chunk=K and --all")
        cfg = a.cfg or replay.run_config(a.workdir, overrides=a.overrides)
        chosen = numbering.select(cfg, a.stage, a.chunk)
        index = export.export(cfg, a.workdir, a.out, chosen,
                              int(a.workers or cfg.data.workers))
        for c in index["chunks"]:
            print(f"{c['path']}  stage {c['stage']} chunk {c['index']}  steps "
                  f"{c['steps'][0]}..{c['steps'][1] - 1}  {c['num_rows']} rows  "
                  f"{c['num_tokens']} tokens  sha256 {c['sha256'][:16]}")
        print(f"wrote {len(index['chunks'])} data chunks to {a.out}")
    return cli.run(body, doc=__doc__.split("\n\n")[0], flags=FLAGS, config=cli.CONFIG_OPTIONAL,
                   argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
