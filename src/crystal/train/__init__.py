"""Training: the pure step (`step.py`), the host loop (`loop.py`), what the loop watches
(`watch.py`) and the CLI (`__main__.py`: `python -m crystal.train`)."""

from crystal.errors import TrainError
from crystal.train.loop import QUARANTINE_FILE, RUN_FILE, check_workdir, plan_start, run
from crystal.train.step import (STEP_KEYS, TrainState, abstract_state, init_state, loss_sums,
                                make_eval_step, make_train_step, token_losses)

__all__ = ["QUARANTINE_FILE", "RUN_FILE", "STEP_KEYS", "TrainError", "TrainState",
           "abstract_state", "check_workdir", "init_state", "loss_sums", "make_eval_step",
           "make_train_step", "plan_start", "run", "token_losses"]
