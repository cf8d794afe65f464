"""The task interface of the checkpoint sweep, and the registry of tasks.

A task is one file in `crystal/eval/` that defines `TASK = Task(...)` (or, for a family of
tasks named `PREFIX:ARG` such as `lm_eval:arc_easy`, a function `make(arg) -> Task`), plus
one line in REGISTRY or FAMILIES below. The sweep (crystal.eval.sweep) calls

    task.evaluate(checkpoint, params, cfg, ctx) -> Result

once per (checkpoint, task) and writes the record; everything a task needs beyond the
checkpoint comes through `ctx` (the workdir, its settings, the seed, the sweep's flags, a
decoder for these params, the run's tokenizer, and a per-sweep `cache` for what is the same
for every checkpoint: an eval set, a sandbox's timing). A task's settings are JSON values
with defaults here, overridden by `--settings=TASK.FIELD=VALUE`; they and the seed are
hashed into the record's identity, so records of other settings never mix (or overwrite
each other).

Why a Result and not a finished record: provenance (checkpoint hash, code commit, settings
hash, status) is the sweep's job, the same for every task; a task returns only what it
measured (`metrics`: scalars for the run's metrics and the figures), what it measured on
(`inputs`: hashes of eval sets and data chunks) and its detail (`body`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
from pathlib import Path
from typing import Any, Callable

from crystal.errors import UsageError

# name -> module defining TASK
REGISTRY = {
    "perplexity": "crystal.eval.perplexity",
    "memorization": "crystal.eval.memorization",
    "humaneval": "crystal.eval.humaneval_task",
    "humaneval_bpb": "crystal.eval.humaneval_bpb",
}
# prefix -> module defining make(arg) -> Task, for names 'prefix:arg'
FAMILIES: dict[str, str] = {
    "lm_eval": "crystal.eval.harness_task",
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the run: its step, directory, meta (config, stage, stage_step,
    release, ...) and identity (sha256 of the meta, which records the save's wallclock and
    commit: a checkpoint saved again at the same step is another checkpoint)."""
    step: int
    path: Path
    meta: dict
    meta_sha256: str

    @property
    def stage(self) -> int:
        return int(self.meta["stage"])

    @property
    def stage_step(self) -> int:
        return int(self.meta["stage_step"])


@dataclasses.dataclass(frozen=True)
class Result:
    """What a task measured: scalars (`metrics`, logged as evals/TASK/NAME at the
    checkpoint's step), hashes of what it measured on (`inputs`) and its detail (`body`)."""
    metrics: dict[str, float]
    inputs: dict[str, Any]
    body: dict


@dataclasses.dataclass
class Context:
    """What a task sees besides the checkpoint: see the module docstring. `decoder()` is
    the cached decoder (crystal.decode.Decoder) over the current checkpoint's params;
    `tokenizer()` the run's tokenizer (WORKDIR/data/tokenizer.model), read once per sweep."""
    workdir: Path
    cfg: Any
    settings: dict
    seed: int
    flags: dict
    cache: dict
    decoder: Callable[[], Any]
    tokenizer: Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation: see the module docstring.

    needs: sweep flags that must be set to run it (e.g. 'allow_code_execution');
    summarize(records, out_dir, ctx) -> [paths]: redraws the task's figures and tables
    (PNG, CSV) from all its records of the current settings (ascending step), after each
    sweep; check(settings): called with the resolved settings before the sweep reads or
    writes anything, raises a UsageError for what they name that does not exist (an
    lm-eval task, a directory)."""
    name: str
    doc: str
    settings: dict
    evaluate: Callable[[Checkpoint, Any, Any, Context], Result]
    summarize: Callable[[list[dict], Path, Context], list[Path]] | None = None
    needs: tuple[str, ...] = ()
    check: Callable[[dict], None] | None = None


def names() -> list[str]:
    """Every task name, and every family as 'prefix:<arg>'."""
    return sorted(REGISTRY) + [f"{p}:<task>" for p in sorted(FAMILIES)]


def get(name: str) -> Task:
    """The task called `name`; an unknown name is a UsageError naming it and the nearest."""
    prefix, colon, arg = name.partition(":")
    if colon and prefix in FAMILIES:
        return _module(name, FAMILIES[prefix]).make(arg)
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, list(REGISTRY) + list(FAMILIES), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UsageError(f"--tasks: no task {name!r}{hint}; tasks: {', '.join(names())}")
    return _module(name, REGISTRY[name]).TASK


def _module(name: str, module: str):
    """A task's module; an optional package it needs that is missing is a UsageError."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "crystal":
            raise
        raise UsageError(f"--tasks={name}: needs the {e.name} package: "
                         f"pip install -e '.[eval]'") from None


def slug(name: str) -> str:
    """A task name as a directory name ('lm_eval:arc_easy' -> 'lm_eval-arc_easy')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def resolve_settings(task: Task, overrides: dict[str, str]) -> dict:
    """The task's settings with `--settings` overrides (FIELD -> text) typed by each
    default's type; an unknown field is a UsageError naming it and the nearest."""
    out = dict(task.settings)
    for field, text in overrides.items():
        flag = f"--settings={task.name}.{field}={text}"
        if field not in out:
            near = difflib.get_close_matches(field, list(out), n=1)
            hint = f" (did you mean {task.name}.{near[0]}?)" if near else ""
            raise UsageError(f"{flag}: task {task.name} has no setting {field!r}{hint}; it "
                             f"has {', '.join(sorted(out)) or 'none'}")
        out[field] = _typed(text, out[field], flag)
    return out


def _typed(text: str, default, flag: str):
    kind = type(default)
    if kind is bool:
        t = text.strip().lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{flag}: expected true or false")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"{flag}: expected {kind.__name__}") from None
    return text
