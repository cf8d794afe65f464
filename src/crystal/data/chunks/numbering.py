"""Which training steps make a data chunk, and the chunks' numbers across a run.

LLM360 released its data as numbered chunks lined up with its checkpoints (Amber:
`train_000.jsonl` ... `train_359.jsonl`, chunk i trained between checkpoints i-1 and i).
Here a data chunk is the same thing: the contiguous run of a stage's steps between two
release checkpoints. A stage's steps split into `min(data.num_chunks, steps)` equal runs
(`chunk_of_step`, the loader's and the training loop's), and the chunks are numbered
across the whole run in stage order: the stage and the index within it are both known from
the number and the other way round. Pure functions of the config.
"""

from __future__ import annotations

import dataclasses

from crystal import config as config_lib
from crystal.errors import DataError


@dataclasses.dataclass(frozen=True)
class DataChunk:
    number: int      # across the run: 0 .. total - 1
    stage: int       # 1-based
    index: int       # within the stage
    first_step: int  # stage steps [first_step, end_step)
    end_step: int

    @property
    def name(self) -> str:
        """'s<stage>c<index>': the chunk in figures and eval records."""
        return f"s{self.stage}c{self.index}"

    def seen_by(self, stage: int, stage_step: int) -> bool:
        """Trained on before a checkpoint at (stage, stage_step)?"""
        return self.stage < stage or (self.stage == stage and self.end_step <= stage_step)

    @property
    def file(self) -> str:
        """The released file name, LLM360's `train_NNN.jsonl` with five digits."""
        return f"train_{self.number:05d}.jsonl"


def stage_steps(cfg, stage: int) -> int:
    return int(config_lib.stage(cfg, stage).steps)


def num_chunks(cfg, stage: int) -> int:
    """Data chunks of a stage: data.num_chunks, fewer if the stage has fewer steps."""
    return max(1, min(int(cfg.data.num_chunks), stage_steps(cfg, stage)))


def chunk_of_step(cfg, stage: int, step: int) -> int:
    """The index within its stage of the data chunk holding stage step `step`."""
    n, steps = num_chunks(cfg, stage), stage_steps(cfg, stage)
    return min(n - 1, int(step) * n // steps)


def chunks(cfg, stage: int | None = None) -> list[DataChunk]:
    """Every data chunk of the run (or of one stage), in order."""
    out, number = [], 0
    for s in range(1, len(config_lib.stage_names(cfg)) + 1):
        n, steps = num_chunks(cfg, s), stage_steps(cfg, s)
        for k in range(n):
            # The first step of chunk k is the first step chunk_of_step maps to k.
            first, end = -(-k * steps // n), -(-(k + 1) * steps // n)
            if stage is None or s == stage:
                out.append(DataChunk(number, s, k, first, end))
            number += 1
    return out


def select(cfg, stage: int | None, chunk: int | None) -> list[DataChunk]:
    """--stage / --chunk as the export takes them: a chunk number is within the stage
    when a stage is given, across the run otherwise; no chunk means all of them."""
    names = config_lib.stage_names(cfg)
    if stage is not None and not 1 <= stage <= len(names):
        raise DataError(f"--stage={stage}: config {cfg.name} has stages 1..{len(names)}")
    got = chunks(cfg, stage)
    if chunk is None:
        return got
    pick = [c for c in got if (c.index if stage is not None else c.number) == chunk]
    if not pick:
        where = f"stage {stage} has data chunks 0..{len(got) - 1}" if stage is not None \
            else f"the run has data chunks 0..{len(got) - 1}"
        raise DataError(f"--chunk={chunk}: {where}")
    return pick
