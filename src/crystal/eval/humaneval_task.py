"""HumanEval pass@k of a checkpoint's own completions: the sweep's `humaneval` task, which
runs model-generated code and so needs `--allow_code_execution`.

For each of the first `problems` problems (the 164, in file order), `crystal.generate`
writes `num_samples` completions of the prompt at `temperature` 0.2 (LLM360's card) and
`top_p` 0.95, seeded by the sweep's seed, and, with `greedy`, one greedy completion; each
ends at the first of humaneval.STOP_SEQUENCES, at EOS or after `max_new_tokens` (256, and
at most half the model's context: 64 for the tiny configs' 128 tokens; the record says
which). A prompt that leaves fewer slots of the context than that loses its oldest tokens
(`truncated_prompts`; in the tiny configs, all of them).
Every completion runs in the sandbox (crystal.eval.sandbox) at the strongest isolation
this machine allows, each problem under EvalPlus's CPU limit, max(4 s, 4 x its canonical
solution's time), timed once per sweep.

Metrics: `pass@1` and `pass@10` of the samples (the unbiased estimator; pass@10 needs
num_samples >= 10), `greedy_pass@1`, `truncated_prompts`, and the canonical solutions'
bits per byte (`bpb`, `bpb_pooled`: crystal.eval.humaneval_bpb). The record has the
isolation that ran and, per problem, every completion with whether it passed and its
failure kind (sandbox.KINDS), never a timing, so evaluating again writes the same bytes.
"""

from __future__ import annotations

from crystal import decode as decode_lib
from crystal import generate as generate_lib
from crystal.errors import UsageError
from crystal.eval import figures
from crystal.eval import humaneval as he
from crystal.eval import humaneval_bpb as bpb_lib
from crystal.eval import sandbox as sandbox_lib
from crystal.eval.tasks import Result, Task

NAME = "humaneval"
DEFAULTS = dict(problems=164, num_samples=20, temperature=0.2, top_p=0.95,
                max_new_tokens=256, greedy=True, batch_size=32, workers=0)


def check(settings: dict) -> None:
    bpb_lib.selected(settings, NAME)
    bad = [(f, why) for f, ok, why in (
        ("num_samples", settings["num_samples"] >= 1, "must be >= 1"),
        ("max_new_tokens", settings["max_new_tokens"] >= 1, "must be >= 1"),
        ("temperature", settings["temperature"] > 0, "must be > 0 (greedy is its own run)"),
        ("top_p", 0 < settings["top_p"] <= 1, "must be in (0, 1]")) if not ok]
    if bad:
        f, why = bad[0]
        raise UsageError(f"--settings={NAME}.{f}={settings[f]}: {why}")


def _sandbox(ctx, problems: list[he.Problem], workers: int):
    """(the sweep's sandbox, per-problem CPU limits): both made once per sweep."""
    if (NAME, "sandbox") not in ctx.cache:
        ctx.cache[(NAME, "sandbox")] = sandbox_lib.Sandbox(
            bool(ctx.flags.get("allow_code_execution")))
    box = ctx.cache[(NAME, "sandbox")]
    key = (NAME, "cpu_limits", tuple(p.task_id for p in problems))
    if key not in ctx.cache:
        ctx.cache[key] = he.cpu_limits(box, key[2], workers or None)
    return box, ctx.cache[key]


def new_tokens(settings: dict, gen) -> int:
    """max_new_tokens, at most half the context (the rest is for the prompt)."""
    return min(int(settings["max_new_tokens"]), gen.context // 2)


def _complete(gen, problems, s: dict, sampling, n: int) -> dict[str, list[str]]:
    """{task id: n completions, each cut at the first stop sequence}."""
    out = gen.generate([p.prompt for p in problems], new_tokens(s, gen), sampling, n,
                       he.STOP_SEQUENCES, s["batch_size"], truncate=True)
    return {p.task_id: [he.truncate(c.text) for c in cs] for p, cs in zip(problems, out)}


def _samples(report: he.Report, task_id: str) -> list[dict]:
    return [dict(completion=x.completion, passed=x.passed, kind=x.kind,
                 exception=x.exception) for x in report.samples[task_id]]


def evaluate(ckpt, params, cfg, ctx) -> Result:
    s = ctx.settings
    problems = bpb_lib.selected(s, NAME)
    box, limits = _sandbox(ctx, problems, s["workers"])
    gen = generate_lib.Generator(ctx.decoder(), ctx.tokenizer())
    sampled = he.evaluate(_complete(gen, problems, s, decode_lib.Sampling(
        s["temperature"], s["top_p"], ctx.seed), s["num_samples"]), box, limits=limits,
        workers=s["workers"] or None)
    greedy = he.evaluate(_complete(gen, problems, s, decode_lib.Sampling(), 1), box,
                         limits=limits, workers=s["workers"] or None) if s["greedy"] else None
    bpb, bpb_rows = bpb_lib.bits_per_byte(params, cfg, ctx, problems, s["batch_size"])
    rows = []
    for p, b in zip(problems, bpb_rows):
        samples = _samples(sampled, p.task_id)
        rows.append(dict(task_id=p.task_id, cpu_limit=limits[p.task_id],
                         truncated_prompt=not gen.fits(gen.encode(p.prompt),
                                                       new_tokens(s, gen)),
                         passed=sum(x["passed"] for x in samples), samples=samples,
                         greedy=_samples(greedy, p.task_id)[0] if greedy else None,
                         bpb=b["bpb"]))
    metrics = dict(sampled.pass_at_k)
    if greedy:
        metrics["greedy_pass@1"] = greedy.pass_at_k["pass@1"]
    metrics.update(bpb, truncated_prompts=float(sum(r["truncated_prompt"] for r in rows)))
    return Result(metrics=metrics,
                  inputs=dict(dataset_sha256=he.dataset_sha256(), problems=len(problems)),
                  body=dict(isolation=box.isolation.describe(),
                            max_new_tokens=new_tokens(s, gen), problems=rows))


def summarize(records, out_dir, ctx):
    keys = [k for k in ("pass@1", "pass@10", "greedy_pass@1") if k in records[-1]["metrics"]]
    return [figures.metric_curves(records, keys, out_dir / "humaneval.png",
                                  "HumanEval pass@k (sandboxed)")]


TASK = Task(name=NAME, doc=__doc__.split("\n\n")[0], settings=DEFAULTS, evaluate=evaluate,
            summarize=summarize, needs=("allow_code_execution",), check=check)
