"""Evaluation: the tasks a checkpoint is scored on, the sweep over checkpoints, their records.

`sandbox` runs untrusted programs (generated code) under kernel isolation and limits;
`humaneval` turns completions for the 164 HumanEval problems into per-problem results and
pass@k through it. Generation is not here: completions come from the caller.
"""
