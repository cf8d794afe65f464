"""lm-evaluation-harness tasks in the sweep: `--tasks=lm_eval:TASK` (the family `lm_eval`).

    python -m crystal.eval --workdir=W --tasks=lm_eval:crystal_mc,lm_eval:arc_easy \
        [--settings=lm_eval:arc_easy.num_fewshot=25,lm_eval:arc_easy.limit=100]

TASK is any task lm-eval knows: its own (ARC, HellaSwag, MMLU, TruthfulQA, ...; their data
come from the user's Hugging Face datasets cache, docs/eval.md), crystal's local ones
(`crystal/eval/lm_eval_tasks/`: crystal_mc, crystal_gen, crystal_ppl, with their data
beside them) or the user's (`include_path`). The checkpoint is evaluated through
crystal.eval.harness.CrystalLM over the params the sweep holds, with lm-eval's seeds all set
from the sweep's seed. The record holds the harness version, each task's config hash and a
hash of the documents, prompts and targets it evaluated (`inputs`), lm-eval's results per
task and subtask, and per document its metrics and the model's answers (`per_doc`).

Settings: num_fewshot (-1: the task's own), limit (0: every document), batch_size,
include_path (directories of task YAMLs, ':'-separated), per_doc, bootstrap_iters (lm-eval's
stderr bootstrap for metrics that are not means).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

from crystal import fileio
from crystal.errors import UsageError
from crystal.eval import figures
from crystal.eval import harness
from crystal.eval.tasks import Result, Task

PREFIX = "lm_eval"
LOCAL_TASKS = Path(__file__).parent / "lm_eval_tasks"
DEFAULTS = dict(num_fewshot=-1, limit=0, batch_size=16, include_path="", per_doc=True,
                bootstrap_iters=100000)
# Parts of a task config that say where it was read, not what it is: left out of its hash.
_UNHASHED = ("config_source",)


@functools.cache
def _manager(paths: tuple[str, ...], defaults: bool) -> TaskManager:
    """lm-eval's task index of `paths` (and its own 14,000 tasks when `defaults`: about
    10 s to build, so crystal's and the user's directories are tried first)."""
    return TaskManager(include_path=list(paths), include_defaults=defaults)


def task_manager(name: str, include_path: str) -> TaskManager:
    """A TaskManager that knows `name`; a name it does not know is a UsageError naming
    the nearest."""
    paths = [str(LOCAL_TASKS)]
    for p in filter(None, include_path.split(":")):
        if not Path(p).is_dir():
            raise UsageError(f"--settings={PREFIX}:{name}.include_path={include_path}: {p}: "
                             f"no such directory")
        paths.append(str(Path(p).resolve()))
    for defaults in (False, True):
        tm = _manager(tuple(paths), defaults)
        if name in tm.all_tasks:
            return tm
    near = difflib.get_close_matches(name, tm.all_tasks, n=1)
    hint = f" (did you mean {PREFIX}:{near[0]}?)" if near else ""
    raise UsageError(f"--tasks={PREFIX}:{name}: lm-evaluation-harness {lm_eval.__version__} "
                     f"has no task {name!r}{hint}")


def _config_sha256(config: dict) -> str:
    meta = {k: v for k, v in (config.get("metadata") or {}).items() if k not in _UNHASHED}
    clean = json.loads(json.dumps(dict(config, metadata=meta), default=handle_non_serializable))
    return fileio.json_sha256(clean)


def _metrics(entry: dict, prefix: str = "") -> dict[str, float]:
    """lm-eval's 'acc,none' -> 'acc', 'exact_match,strict-match' ->
    'exact_match/strict-match'; stderrs and non-numbers left out."""
    out = {}
    for key, value in entry.items():
        name, comma, filt = key.partition(",")
        if comma and not name.endswith("_stderr") and isinstance(value, (int, float)):
            out[prefix + (name if filt == "none" else f"{name}/{filt}")] = float(value)
    return out


def _per_doc(samples: list[dict]) -> list[dict]:
    keep = ("doc_id", "target", "filtered_resps")
    return [{k: s[k] for k in keep} | {m: s[m] for m in s["metrics"]} for s in samples]


def _run(name: str, lm, settings: dict, tm: TaskManager, seed: int) -> dict:
    """lm-eval's simple_evaluate on one task (or group), every seed from the sweep's."""
    return lm_eval.simple_evaluate(
        model=lm, tasks=[name], task_manager=tm,
        num_fewshot=None if settings["num_fewshot"] < 0 else settings["num_fewshot"],
        limit=settings["limit"] or None, bootstrap_iters=settings["bootstrap_iters"],
        log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, confirm_run_unsafe_code=False)


def evaluate(name: str, ckpt, params, cfg, ctx) -> Result:
    s = ctx.settings
    tm = task_manager(name, s["include_path"])
    lm = harness.CrystalLM(params, cfg, ctx.tokenizer(), ctx.decoder,
                           s["batch_size"], seed=ctx.seed, info=dict(step=ckpt.step))
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    out = _run(name, lm, s, tm, ctx.seed)
    samples = out.pop("samples")
    tasks, inputs = {}, dict(harness_version=lm_eval.__version__, config_sha256={},
                             docs_sha256={})
    for task, config in sorted(out["configs"].items()):
        inputs["config_sha256"][task] = _config_sha256(config)
        inputs["docs_sha256"][task] = fileio.json_sha256(
            [[x["doc_hash"], x["prompt_hash"], x["target_hash"]] for x in samples[task]])
        tasks[task] = dict(version=out["versions"].get(task), n_shot=out["n-shot"].get(task),
                           n_samples=out["n-samples"].get(task),
                           higher_is_better=out["higher_is_better"].get(task))
        if s["per_doc"]:
            tasks[task]["docs"] = _per_doc(samples[task])
    metrics = _metrics(out["results"].get(name, {}))
    for sub, entry in sorted(out["results"].items()):
        if sub != name:
            metrics.update(_metrics(entry, f"{sub}/"))
    results = json.loads(json.dumps(out["results"], default=handle_non_serializable))
    body = dict(harness=dict(version=lm_eval.__version__), results=results, tasks=tasks,
                groups=out.get("group_subtasks", {}))
    return Result(metrics=metrics, inputs=inputs, body=json.loads(
        json.dumps(body, default=handle_non_serializable)))


def summarize(name: str, records, out_dir, ctx):
    keys = [k for k in records[-1]["metrics"] if "/" not in k]
    return [figures.metric_curves(records, keys, out_dir / f"{PREFIX}-{name}.png",
                                  f"lm-eval {name}")]


def check(name: str, settings: dict) -> None:
    """Before the sweep reads anything: the task exists (with the user's include_path)."""
    task_manager(name, settings["include_path"])


def make(name: str) -> Task:
    if not name:
        raise UsageError(f"--tasks={PREFIX}:: name an lm-eval task (e.g. {PREFIX}:arc_easy)")
    return Task(name=f"{PREFIX}:{name}", doc=__doc__.split("\n\n")[0], settings=DEFAULTS,
                evaluate=functools.partial(evaluate, name),
                summarize=functools.partial(summarize, name),
                check=functools.partial(check, name))
