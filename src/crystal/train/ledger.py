"""The run ledger: every start, resume, stage change, stop, preemption, rollback and
quarantine of a run, appended by the training loop as it happens.

    WORKDIR/ledger.jsonl     one JSON object per line: {"event", "time", "step", "stage",
                             "stage_step", "lr", ...}

Why a ledger: LLM360's Amber report lists what happened to the run (NaN chunks skipped,
restarts that re-initialised AdamW) from memory; a release should carry it as data. The
metrics say what each step measured, the checkpoints what state was saved; the ledger says
why the timeline looks the way it does (an invocation started here, a rollback abandoned
steps 41-44, stage 2 began from this checkpoint). It is written, never reconstructed: one
line per event, flushed and fsynced, so a kill -9 loses at most a half-written last line,
which `read` drops. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from crystal.errors import TrainError

LEDGER_FILE = "ledger.jsonl"
EVENTS = ("start", "stage_start", "stage_end", "stop", "rollback", "quarantine", "finish")


class Ledger:
    """Appends events to WORKDIR/ledger.jsonl (a no-op on processes other than 0)."""

    def __init__(self, workdir, enabled: bool = True):
        self.path = Path(workdir) / LEDGER_FILE
        self.enabled = enabled
        if enabled and self.path.exists():
            self._drop_cut_line()

    def _drop_cut_line(self):
        """A kill -9 mid-write leaves a last line without its newline: cut it off, so the
        next event starts a line of its own."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def record(self, event: str, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown ledger event {event!r}")
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        if self.enabled:
            line = json.dumps(rec, sort_keys=True) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return rec


def read(workdir) -> list[dict]:
    """The events of WORKDIR/ledger.jsonl in order ([] when there is none). A cut last line
    (a crash mid-write) is dropped; a bad line elsewhere is an error naming file:line."""
    path = Path(workdir) / LEDGER_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise TrainError(f"{path}:{i + 1}: bad ledger line ({e.msg})") from None
    return out
