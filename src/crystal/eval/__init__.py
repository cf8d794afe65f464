"""Evaluation: the tasks a checkpoint is scored on, the sweep over checkpoints, their records.

`python -m crystal.eval` (`__main__`, `sweep`) evaluates a run's checkpoints once per task
and writes one record per (checkpoint, task) (`records`); a task is one file here
registered in `tasks` (`perplexity`, `memorization`), its figures in `figures`. `sandbox`
runs untrusted programs (generated code) under kernel isolation and limits; `humaneval`
turns completions for the 164 HumanEval problems into per-problem results and pass@k
through it. Generation is `crystal.decode` / `crystal.generate`.
"""
