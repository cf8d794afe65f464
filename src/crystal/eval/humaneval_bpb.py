"""Bits per byte of HumanEval's canonical solutions given their prompts: the sweep's
`humaneval_bpb` task (OLMo's in-loop code metric).

For each problem the context is its prompt and the continuation its canonical solution,
tokenized by the run's tokenizer after an EOS and split as lm-eval splits them
(`scoring.encode_pair`); the solution's log-likelihood comes from crystal's own per-token
training loss (`crystal.eval.scoring`, in windows where prompt and solution exceed the
context). A problem's bits per byte is -log p / (ln 2 x the solution's UTF-8 bytes); the
metrics are `bpb`, their mean over problems (OLMo's), and `bpb_pooled`, all bits over all
bytes. It runs no code, so it can run at every checkpoint, and it moves for tiny models
whose pass@k is 0. `crystal.eval.humaneval_task` records the same numbers beside pass@k.

Settings: problems (the first N of the 164, in file order), batch_size.
"""

from __future__ import annotations

import math

from crystal.errors import UsageError
from crystal.eval import figures, scoring
from crystal.eval import humaneval as he
from crystal.eval.tasks import Result, Task

DEFAULTS = dict(problems=164, batch_size=16)


def selected(settings: dict, task: str) -> list[he.Problem]:
    """The first `problems` problems; another count is a UsageError naming the setting."""
    n, probs = int(settings["problems"]), list(he.problems().values())
    if not 1 <= n <= len(probs):
        raise UsageError(f"--settings={task}.problems={n}: expected 1 to {len(probs)}")
    return probs[:n]


def check(settings: dict) -> None:
    selected(settings, "humaneval_bpb")


def bits_per_byte(params, cfg, ctx, problems: list[he.Problem], batch_size: int):
    """(metrics {bpb, bpb_pooled}, per-problem rows) of the canonical solutions."""
    key = ("humaneval_bpb", len(problems))
    if key not in ctx.cache:
        tok = ctx.tokenizer()
        ctx.cache[key] = [scoring.encode_pair(tok, p.prompt, p.canonical_solution)
                          for p in problems]
    scores = scoring.Scorer(params, cfg, batch_size).score(ctx.cache[key])
    rows, bits_total, bytes_total = [], 0.0, 0
    for p, s in zip(problems, scores):
        bits, size = -s.logprob / math.log(2), len(p.canonical_solution.encode("utf-8"))
        rows.append(dict(task_id=p.task_id, tokens=s.tokens, bytes=size, bits=bits,
                         bpb=bits / size))
        bits_total, bytes_total = bits_total + bits, bytes_total + size
    metrics = dict(bpb=sum(r["bpb"] for r in rows) / len(rows),
                   bpb_pooled=bits_total / bytes_total)
    return metrics, rows


def evaluate(ckpt, params, cfg, ctx) -> Result:
    problems = selected(ctx.settings, "humaneval_bpb")
    metrics, rows = bits_per_byte(params, cfg, ctx, problems, ctx.settings["batch_size"])
    return Result(metrics=metrics, inputs=dict(dataset_sha256=he.dataset_sha256(),
                                               problems=len(problems)),
                  body=dict(problems=rows))


def summarize(records, out_dir, ctx):
    return [figures.metric_curves(records, ["bpb", "bpb_pooled"], out_dir /
                                  "humaneval_bpb.png", "HumanEval canonical solutions, "
                                  "bits per byte")]


TASK = Task(name="humaneval_bpb", doc=__doc__.split("\n\n")[0], settings=DEFAULTS,
            evaluate=evaluate, summarize=summarize, check=check)
