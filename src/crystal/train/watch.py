"""What the training loop watches besides the step: progress, signals, loss spikes and
non-finite steps. Host-side policy only; each class is one rule with its reason."""

from __future__ import annotations

import collections
import math
import signal
import sys
import threading
import time

import numpy as np
from tqdm import tqdm


class Progress:
    """A tqdm bar on a terminal (step, stage, loss, tokens/s, ETA); plain log lines, about
    twenty a run, when stderr is not a terminal (CI logs, Slurm files)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.tty = bool(enabled) and sys.stderr.isatty()
        self.total, self.done, self.t0 = total, initial, time.time()
        self.start = initial
        self.every = max(1, total // 20)
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step") \
            if self.tty else None

    def update(self, step: int, stage: int, loss: float, tok_s: float):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"step {step} stage {stage} loss {loss:.4f} "
                                     f"{tok_s:,.0f} tok/s")
            return
        if self.done % self.every and self.done != self.total:
            return
        rate = (self.done - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        print(f"step {step} ({self.done}/{self.total}) stage {stage} loss {loss:.4f} "
              f"{tok_s:,.0f} tok/s eta {eta:,.0f}s", flush=True)

    def write(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Signals:
    """SIGTERM / SIGINT set a flag; the loop checkpoints and exits at the next step, so a
    preempted job loses nothing (Slurm and Kubernetes send SIGTERM before SIGKILL)."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class SpikeDetector:
    """Rolling z-score of the loss over the last `window` finite steps: a spike is logged
    (`spike`, `loss_zscore`) and printed, never acted on."""

    def __init__(self, window: int, z: float):
        self.hist = collections.deque(maxlen=max(int(window), 2))
        self.z = float(z)

    def __call__(self, loss: float) -> float:
        score = 0.0
        if len(self.hist) >= min(10, self.hist.maxlen):
            mu, sd = float(np.mean(self.hist)), float(np.std(self.hist))
            score = (loss - mu) / max(sd, 1e-6)
        if math.isfinite(loss):
            self.hist.append(loss)
        return score


class BadSteps:
    """The non-finite steps of the last `window` stage steps, with the data shards of the
    rows that went bad: `max_bad` of them mean a data problem (LLM360 saw NaNs on 4 of 360
    Amber chunks), answered by a rollback that quarantines the worst shard."""

    def __init__(self, window: int, max_bad: int):
        self.window, self.max_bad = int(window), int(max_bad)
        self.steps = collections.deque()      # (stage step, shard names of the bad rows)

    def add(self, stage_step: int, names: list[str]):
        self.steps.append((stage_step, names))

    def expire(self, stage_step: int):
        while self.steps and self.steps[0][0] <= stage_step - self.window:
            self.steps.popleft()

    def full(self) -> bool:
        return len(self.steps) >= self.max_bad

    def culprit(self) -> tuple[str, int]:
        counts = collections.Counter()
        for _, names in self.steps:
            counts.update(names)
        return counts.most_common(1)[0]

    def clear(self):
        self.steps.clear()
