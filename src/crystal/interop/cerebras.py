"""Cerebras Model Zoo params.yaml to and from crystal configs: `python -m
crystal.interop.cerebras`.

    python -m crystal.interop.cerebras import --params=PHASE1.yaml[,PHASE2.yaml,...]
        --out=CONFIG.json [--config=BASE]
    python -m crystal.interop.cerebras export --config=FILE [--stage=N] --out=params.yaml

import: each params.yaml (rel-1.9 flat, as LLM360 published CrystalCoder's phases, or the
2.x `trainer:` format; a 2.x list of trainers is several phases) becomes one stage: model,
muP constants, optimizer groups, the phase's schedule, batch size, max_steps and the data
mixture weights where the file has them (cerebras_import.py). Everything a params.yaml does
not say (tokenizer, data input, metrics, mesh) comes from --config (default:
configs/crystalcoder_7b.py). Writes a crystal config JSON (`--config=CONFIG.json` loads it)
and lists every key it did not use.

export: one stage of a config as a rel-1.9 params.yaml (cerebras_export.py).
Both refuse to overwrite --out; bad input is one line naming the file, line and key.
"""

from __future__ import annotations

from pathlib import Path

from crystal import cli, fileio
from crystal import config as config_lib
from crystal.errors import UsageError
from crystal.interop import cerebras_export, cerebras_format, cerebras_import

DEFAULT_BASE = "crystalcoder_7b"

FLAGS = (
    cli.Flag("action", "import (params.yaml -> crystal config) or export (crystal config -> "
             "params.yaml)", positional=True, required=True, choices=("import", "export")),
    cli.Flag("params", "import: params.yaml files, one per phase, in order", list),
    cli.Flag("stage", "export: the stage to write", int, default=1),
    cli.Flag("out", "the file to write (must not exist)", required=True),
)


def import_files(files, out, base=None) -> dict:
    """Writes the crystal config of params.yaml `files` to `out`; returns the report."""
    base_cfg = base if base is not None else config_lib.load(DEFAULT_BASE)
    cfg, report = cerebras_import.to_config([str(f) for f in files], base_cfg)
    _refuse_existing(out)
    fileio.write_json(out, config_lib.to_json_dict(cfg), sort_keys=True)
    return dict(report, config=cfg)


def export_stage(cfg, stage: int, out) -> dict:
    data = cerebras_export.params(cfg, stage)
    _refuse_existing(out)
    with fileio.atomic_open(out, "w") as f:
        f.write(cerebras_format.dump(data))
    return data


def _refuse_existing(out):
    if Path(out).exists():
        raise UsageError(f"--out={out}: already exists; choose another file")


def _print_import(r: dict, out):
    cfg = r["config"]
    print(f"crystal.interop.cerebras: wrote {out} ({len(cfg.stages)} stages; load it with "
          f"--config={out})")
    for name in config_lib.stage_names(cfg):
        s = cfg.stages[name]
        sc = s.schedule
        print(f"  {name}: {s.steps} steps, {sc.kind} warmup {sc.warmup_steps} to "
              f"{sc.peak_lr:g}, then to {sc.end_lr:g} over {sc.decay_steps}; "
              f"{len(s.mixture)} mixture components"
              + ("; fresh Adam state" if s.reset_optimizer else ""))
    for note in r["notes"]:
        print(f"  note: {note}")
    for f, keys in r["unknown"].items():
        if keys:
            print(f"  unknown keys in {f} (not used): {', '.join(keys)}")
    for f, keys in r["runtime"].items():
        if keys:
            print(f"  runtime keys in {f} (no crystal meaning, not used): {len(keys)}: "
                  f"{', '.join(keys)}")


def _main(a):
    if a.action == "import":
        if not a.params:
            raise UsageError("--params is required for import (one params.yaml per phase)")
        if "stage" in a.given:
            raise UsageError("--stage: export only")
        r = import_files(a.params, a.out, a.cfg)
        _print_import(r, a.out)
        return 0
    if a.params:
        raise UsageError("--params: import only")
    cfg = a.cfg or cli.load_config(a)
    export_stage(cfg, a.stage, a.out)
    print(f"crystal.interop.cerebras: wrote {a.out} (config {cfg.name}, stage {a.stage})")
    return 0


HELP = """Cerebras Model Zoo params.yaml to and from crystal configs (docs/interop.md).

  import --params=P1.yaml,... --out=X.json   one stage per phase; --config is the base for
                                             what a params.yaml does not say (default:
                                             configs/crystalcoder_7b.py)
  export --config=FILE --stage=N --out=P.yaml   one stage in the rel-1.9 format"""


def main(argv=None):
    return cli.run(_main, doc=HELP, flags=FLAGS,
                   config=cli.CONFIG_OPTIONAL, argv=argv,
                   prog="python -m crystal.interop.cerebras")


if __name__ == "__main__":
    raise SystemExit(main())
