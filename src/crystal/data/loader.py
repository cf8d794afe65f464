"""The training data loader: one stage's global batches, resumable in O(1), replayable.

Global batch N of stage S is records [N*B, (N+1)*B) of `StageMixture(S).dataset()`; process
p of P takes rows [p*B/P, (p+1)*B/P) of it and reads only those. The pipeline is a grain
MapDataset (records -> examples -> batches of B/P, every P-th one from p) turned into an
iterator with reader threads and, if configured, worker processes. Because every batch is
a pure function of its step, the iterator state is just the step (plus quarantined shards):
restoring rebuilds the iterator at `batches[step:]` without touching earlier batches, and
`replay.replay_batch` computes any batch by indexing the same dataset.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import grain
import numpy as np
from absl import flags

from crystal import fileio
from crystal.data import fim as fim_lib
from crystal.data import manifest as man_lib
from crystal.data import mixture as mix_lib
from crystal.data.chunks import numbering
from crystal.data.manifest import data_dir
from crystal.errors import DataError

log = logging.getLogger(__name__)

STATE_FORMAT = 2      # 2: skips name shards ({'shard', 'from_step'})
LEDGER = "skipped_shards.json"


# ----------------------------------------------------------------------------- ledger


def read_manifest(workdir) -> tuple[dict, str]:
    """(manifest, sha256 of its bytes): the data identity checkpoints record."""
    return man_lib.read(workdir)


def read_ledger(workdir) -> dict:
    path = Path(workdir) / LEDGER
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None


def write_ledger(workdir, ledger: dict):
    fileio.write_json(Path(workdir) / LEDGER, ledger, sort_keys=True)


# ----------------------------------------------------------------------------- examples


class ExampleReader:
    """Provenance record -> training example; stateless apart from its mmap cache.

    FIM draws are seeded by (seed, stage, epoch, group, shard, row), so the example is a
    pure function of the record. Picklable for grain workers (mmaps reopen lazily).
    """

    def __init__(self, workdir, manifest: dict, mixture: mix_lib.StageMixture | None,
                 seed: int, stage: int, spm_rate: float):
        self.root = data_dir(workdir)
        self.seq_len = int(manifest["seq_len"])
        self.seed, self.stage, self.spm_rate = int(seed), int(stage), float(spm_rate)
        self.group_names = man_lib.group_names(manifest)
        self.paths = {}
        for gi, g in enumerate(self.group_names):
            gm = manifest["groups"][g]
            for sh in gm["shards"]:
                self.paths[(gi, int(sh["index"]))] = (sh["path"], int(sh["num_sequences"]))
            if gm.get("val"):
                self.paths[(gi, -1)] = (gm["val"]["path"], int(gm["val"]["num_sequences"]))
        self.fim_rates = [c.fim_rate for c in mixture.components] if mixture else []
        self.codec = self.ids = None
        if any(r > 0 for r in self.fim_rates):
            tok = manifest["tokenizer"]
            self.codec = fim_lib.FimCodec.from_file(self.root / tok.get("path",
                                                                        "tokenizer.model"))
            base = int(tok["vocab_size"])
            try:
                self.ids = fim_lib.FimIds.from_specials(base, tok.get("special_tokens", ()))
            except ValueError as e:
                raise DataError(f"{self.root / 'manifest.json'}: tokenizer.special_tokens: "
                                  f"{e}") from None
            if self.codec.vocab_size != base:
                raise DataError(f"{self.root / tok.get('path', 'tokenizer.model')}: "
                                  f"{self.codec.vocab_size} pieces, manifest tokenizer."
                                  f"vocab_size says {base}")
        self._arrays, self._lock = {}, threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arrays"], d["_lock"] = {}, None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def array(self, group: int, shard: int) -> np.ndarray:
        key = (group, shard)
        a = self._arrays.get(key)
        if a is not None:
            return a
        # One opener at a time: CPython 3.11's parser (np.load reads the .npy header with
        # ast.literal_eval) is not thread-safe
        # ("AST constructor recursion depth mismatch"), and grain reads in threads.
        with self._lock:
            a = self._arrays.get(key)
            if a is not None:
                return a
            rel, n = self.paths[key]
            path = self.root / rel
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot read shard: {e}") from None
            if a.ndim != 2 or a.shape != (n, self.seq_len + 1):
                raise DataError(f"{path}: shape {a.shape}, manifest says "
                                  f"({n}, {self.seq_len + 1})")
            self._arrays[key] = a
        return a

    def tokens(self, group: int, shard: int, row: int) -> np.ndarray:
        return np.asarray(self.array(group, shard)[row], np.int32)

    def row(self, rec: dict) -> tuple[np.ndarray, int, int]:
        """(tokens_T, num_valid, num_fim) of a record: its stored row, FIM'd when its
        component draws FIM; tokens at or past num_valid are padding."""
        toks_T = self.tokens(rec["group"], rec["shard"], rec["row"])
        rate = self.fim_rates[rec["component"]] if rec["component"] >= 0 else 0.0
        if rate <= 0:
            return toks_T, toks_T.shape[0], 0
        rng = fim_lib.fim_rng(self.seed, self.stage, rec["epoch"], rec["group"],
                              rec["shard"], rec["row"])
        return fim_lib.apply_fim(toks_T, rng, self.codec, self.ids, rate, self.spm_rate)

    def __call__(self, rec: dict) -> dict:
        toks_T, num_valid, num_fim = self.row(rec)
        return make_example(toks_T, num_valid, rec, num_fim)


ROW_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids")
SCALAR_FIELDS = {"source_id": np.int32, "group": np.int32, "component": np.int32,
                 "shard": np.int32, "row": np.int32, "epoch": np.int32, "index": np.int64,
                 "fim": np.int32, "substituted": np.int32}


def loss_tokens(num_valid: int, L: int) -> int:
    """How many of a row's L targets have loss: those before the padding (tokens at or
    past num_valid); the loss mask is that many ones, then zeros."""
    return max(0, min(L, num_valid - 1))


def make_example(toks_T: np.ndarray, num_valid: int, rec: dict, num_fim: int = 0) -> dict:
    """Inputs/targets/masks of one packed row; tokens at or past num_valid are padding.

    Per-row provenance stays Python ints here; `collate` gives them their dtypes."""
    inputs_L, targets_L = toks_T[:-1], toks_T[1:]
    L = inputs_L.shape[0]
    valid_L = np.arange(L) < num_valid
    loss_mask_L = np.zeros((L,), np.float32)
    loss_mask_L[:loss_tokens(num_valid, L)] = 1.0
    # Document index within the row (1-based): a document ends with (and owns) its EOS.
    seg_L = np.ones((L,), np.int32)
    seg_L[1:] += np.cumsum(inputs_L[:-1] == fim_lib.EOS_ID, dtype=np.int32)
    seg_L[~valid_L] = 0
    return dict(inputs=inputs_L, targets=targets_L, loss_mask=loss_mask_L, segment_ids=seg_L,
                source_id=rec["group"], group=rec["group"], component=rec["component"],
                shard=rec["shard"], row=rec["row"], epoch=rec["epoch"], index=rec["index"],
                fim=num_fim, substituted=rec.get("substituted", 0))


def collate(examples) -> dict:
    """Examples -> a batch: (B, L) token arrays, (B,) provenance with fixed dtypes."""
    out = {k: np.stack([e[k] for e in examples]) for k in ROW_FIELDS}
    out["inputs"] = out["inputs"].astype(np.int32, copy=False)
    out["targets"] = out["targets"].astype(np.int32, copy=False)
    for k, dt in SCALAR_FIELDS.items():
        out[k] = np.fromiter((e[k] for e in examples), dtype=dt, count=len(examples))
    return out


class _ValRecord:
    def __init__(self, group: int, num_val: int):
        self.group, self.num_val = group, num_val

    def __call__(self, j: int) -> dict:
        return dict(index=int(j), component=-1, group=self.group, shard=-1,
                    row=int(j) % self.num_val, epoch=int(j) // self.num_val)


# ----------------------------------------------------------------------------- the loader


class StageLoader:
    """Iterator over one stage's per-process batches; see the module docstring.

    skip_shards: shard names ('group:index', fnmatch on group; or 'group/shard_K.npy')
    quarantined from step 0, or {'shard', 'from_step'} dicts. Skips recorded in
    WORKDIR/skipped_shards.json for this stage are applied too (`use_ledger`).
    """

    def __init__(self, cfg, workdir, stage: int, process_index: int = 0,
                 process_count: int = 1, skip_shards=(), use_ledger: bool = True):
        self.cfg, self.workdir, self.stage = cfg, Path(workdir), int(stage)
        self.manifest, self.data_sha256 = read_manifest(workdir)
        man_path = man_lib.path(workdir)
        if int(self.manifest["seq_len"]) != int(cfg.data.seq_len):
            raise DataError(f"{man_path}: seq_len {self.manifest['seq_len']} != config "
                              f"data.seq_len {cfg.data.seq_len}")
        B = int(cfg.train.global_batch_size)
        if not (0 <= process_index < process_count):
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        if B % process_count:
            raise DataError(f"train.global_batch_size {B} is not divisible by "
                              f"process_count {process_count}")
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.global_batch_size = B
        self.batch_size_per_process = B // process_count
        self.group_names = man_lib.group_names(self.manifest)
        self._skips_in = list(skip_shards)
        if use_ledger:
            self._skips_in += read_ledger(workdir).get(f"stage_{self.stage}", [])
        try:
            self.mixture = mix_lib.StageMixture(cfg, self.manifest, self.stage,
                                                self._skips_in)
        except DataError as e:
            raise DataError(str(e)) from None
        self.steps = self.mixture.steps
        self.reader = ExampleReader(workdir, self.manifest, self.mixture, cfg.seed,
                                    self.stage, cfg.data.fim_spm_rate)
        self._build()
        self._step = 0
        self._it = None

    # ------------------------------------------------------------------ datasets

    def _build(self):
        self._examples = self.mixture.dataset().map(self.reader)

    def rows(self, start: int, stop: int):
        """(record, tokens_T, num_valid, num_fim) of global records [start, stop), one after
        the other: the rows global batches N*B .. stack, without the example arrays
        (the data-chunk export reads them here)."""
        records = self.mixture.dataset()
        for g in range(start, stop):
            rec = records[g]
            yield (rec, *self.reader.row(rec))

    def global_batches(self) -> grain.MapDataset:
        """MapDataset: element N is global batch N (all B rows, in row order)."""
        return self._examples.batch(self.global_batch_size, batch_fn=collate)

    def process_batches(self) -> grain.MapDataset:
        """MapDataset: element N is this process's rows of global batch N."""
        b, P = self.batch_size_per_process, self.process_count
        return self._examples.batch(b, batch_fn=collate)[self.process_index::P]

    def example(self, index: int) -> dict:
        """The training example of global record `index`: row index % B of the global batch
        of step index // B (what the step trained on, FIM and quarantine included)."""
        if not 0 <= index < self.mixture.num_records:
            raise DataError(f"record {index}: stage {self.stage} has records "
                            f"0..{self.mixture.num_records - 1}")
        return self._examples[int(index)]

    def global_batch(self, step: int) -> dict:
        if not 0 <= step < self.steps:
            raise DataError(f"step {step}: stage {self.stage} has steps 0..{self.steps - 1}")
        return self.global_batches()[step]

    # ------------------------------------------------------------------ iteration

    def _iterator(self):
        d = self.cfg.data
        ds = self.process_batches()[self._step:].to_iter_dataset(grain.ReadOptions(
            num_threads=int(d.loader_threads), prefetch_buffer_size=int(d.loader_prefetch)))
        if int(d.loader_workers) > 0:
            if not flags.FLAGS.is_parsed():   # grain reads its absl flags in the workers
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=int(d.loader_workers),
                per_worker_buffer_size=max(1, int(d.loader_prefetch))))
        return iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._step >= self.steps:
            raise StopIteration
        if self._it is None:
            self._it = self._iterator()
        batch = next(self._it)
        self._step += 1
        return batch

    next = __next__

    @property
    def step(self) -> int:
        """The stage step of the next batch."""
        return self._step

    def close(self):
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    # ------------------------------------------------------------------ state

    def get_state(self) -> dict:
        """Small JSON state: the next step and the quarantined shards, plus identity."""
        return dict(format=STATE_FORMAT, stage=self.stage, step=self._step,
                    skips=[s.to_json() for s in self.mixture.skips],
                    data_sha256=self.data_sha256, seed=int(self.cfg.seed),
                    global_batch_size=self.global_batch_size)

    def set_state(self, state: dict):
        """Resume at state['step'] in O(1); refuses a state of another stage or data."""
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"loader state: field format {state.get('format')!r} != "
                              f"{STATE_FORMAT}")
        for key, mine in (("stage", self.stage), ("data_sha256", self.data_sha256),
                          ("seed", int(self.cfg.seed)),
                          ("global_batch_size", self.global_batch_size)):
            if state.get(key) != mine:
                raise DataError(f"loader state: field {key} is {state.get(key)!r}, this "
                                  f"loader has {mine!r}")
        step = int(state["step"])
        if not 0 <= step <= self.steps:
            raise DataError(f"loader state: field step {step} not in [0, {self.steps}]")
        try:
            merged = mix_lib.parse_skips([*self.mixture.skips, *state.get("skips", [])],
                                         self.mixture.all_shards)
        except DataError as e:
            raise DataError(f"loader state: field skips: {e}") from None
        self.close()
        if merged != self.mixture.skips:
            self._set_skips(merged)
        self._step = step

    # ------------------------------------------------------------------ quarantine

    def skip_shard(self, shard: str, from_step: int | None = None):
        """Quarantine a shard from `from_step` (default: the next step) on; recorded in the
        state and, by process 0, in WORKDIR/skipped_shards.json (replay reads it)."""
        from_step = self._step if from_step is None else int(from_step)
        self.close()
        self._set_skips([*self.mixture.skips, {"shard": shard, "from_step": from_step}])
        if self.process_index == 0:
            ledger = read_ledger(self.workdir)
            ledger[f"stage_{self.stage}"] = [s.to_json() for s in self.mixture.skips]
            write_ledger(self.workdir, ledger)
        log.warning("stage %d: shard %s quarantined from step %d", self.stage, shard,
                    from_step)

    def _set_skips(self, skips):
        try:
            self.mixture = mix_lib.StageMixture(self.cfg, self.manifest, self.stage, skips)
        except DataError as e:
            raise DataError(str(e)) from None
        self._build()

    # ------------------------------------------------------------------ bookkeeping

    @property
    def num_chunks(self) -> int:
        """LLM360 data chunks in this stage (crystal.data.chunks.numbering)."""
        return numbering.num_chunks(self.cfg, self.stage)

    def chunk_of_step(self, step: int) -> int:
        """The data chunk (within the stage) of a step: the run of steps between two
        release checkpoints (crystal.data.chunks.numbering)."""
        return numbering.chunk_of_step(self.cfg, self.stage, step)

    def val_batches(self, n: int, groups=None) -> dict[str, list[dict]]:
        """n deterministic validation batches per group (default: the stage's groups),
        this process's rows of each; no FIM, rows cycle if a val set is small."""
        groups = groups or sorted({g for c in self.mixture.components for g in c.groups})
        reader = ExampleReader(self.workdir, self.manifest, None, self.cfg.seed, self.stage,
                               self.cfg.data.fim_spm_rate)
        out = {}
        b, P, B = self.batch_size_per_process, self.process_count, self.global_batch_size
        for g in groups:
            gi = self.group_names.index(g)
            val = self.manifest["groups"][g].get("val")
            if not val or int(val["num_sequences"]) == 0:
                continue
            ds = (grain.MapDataset.range(n * B).map(_ValRecord(gi, int(val["num_sequences"])))
                  .map(reader).batch(b, batch_fn=collate)[self.process_index::P])
            out[g] = [ds[i] for i in range(n)]
        return out
