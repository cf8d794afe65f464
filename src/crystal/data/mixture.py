"""A stage's data mixture as an index: global record g -> (component, group, shard, row, epoch).

Everything here is index arithmetic on grain `MapDataset`s, no I/O, so record g of a stage
is computable in O(1) from the config, the manifest and the seed. That one function is the
training order, the resume point (step * B) and the replay (docs/loader.md):

- component c (one `stages.stage_N.mixture` entry) owns the rows of its groups' train
  shards, laid end to end (groups sorted, shards by index): rows 0 .. n_c - 1;
- its stream is an endless sequence of epochs, each a fresh permutation of its rows seeded
  by (seed, stage, component, epoch): stream index k is row perm_e(k mod n_c), epoch
  e = k // n_c (`EpochShuffle`);
- components are interleaved by `MapDataset.mix` with the configured weights: a
  deterministic, exactly proportional pattern (every window of W records holds each
  component's share up to rounding), not a random draw;
- the stage is the first steps * global_batch_size records of that mix.

Quarantined shards: from a skip's `from_step` on, a record whose row lies in a skipped shard
is replaced by a row drawn (seeded by component, epoch and skip level) from the component's
remaining shards. Every other record keeps its place, so a skip changes only the rows that
came from the skipped shard, and records before `from_step` are untouched.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import sys

import grain
import numpy as np

from crystal import config as cfg_lib
from crystal.data import manifest as man_lib
from crystal.errors import DataError

log = logging.getLogger(__name__)




def _seed32(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0])


_TAG_SHUFFLE, _TAG_SKIP = 0x4D4958, 0x534B50
# Part of the data order, like a file format: permutations of up to this many rows are
# numpy permutations held in memory (grain's index_shuffle cycle-walks and costs ~1 ms a
# lookup on tiny ranges); longer ones use index_shuffle (O(1) memory, ~6 us a lookup).
MATERIALIZE_MAX_ROWS = 1 << 22


class Permutations:
    """perm(n, seed)[pos] for many (n, seed), a few materialised at a time."""

    def __init__(self, keep: int = 8):
        self._cache: dict = {}
        self._keep = keep

    def __getstate__(self):
        return {"_cache": {}, "_keep": self._keep}

    def __call__(self, pos: int, n: int, seed: int) -> int:
        if n > MATERIALIZE_MAX_ROWS:
            return int(grain.experimental.index_shuffle(pos, max_index=n - 1, seed=seed,
                                                        rounds=4))
        perm = self._cache.get((n, seed))
        if perm is None:
            perm = np.random.Generator(np.random.PCG64(seed)).permutation(n).astype(np.int32)
            if len(self._cache) >= self._keep:
                self._cache.pop(next(iter(self._cache)), None)
            self._cache[(n, seed)] = perm
        return int(perm[pos])


class EpochShuffle(grain.MapDataset):
    """Endless stream over rows 0..n-1: element k is (k, perm_{k // n}(k % n)), each epoch
    a new permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        super().__init__([])
        self.n, self.seed = int(n), int(seed)
        self._perm = Permutations()
        self._epoch_seeds: dict[int, int] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"EpochShuffle(n={self.n})"

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        epoch, pos = divmod(int(k), self.n)
        seed = self._epoch_seeds.get(epoch)
        if seed is None:
            seed = self._epoch_seeds[epoch] = _seed32(self.seed, epoch)
        return int(k), self._perm(pos, self.n, seed)


@dataclasses.dataclass
class Component:
    """One mixture entry resolved against the manifest."""
    name: str
    index: int
    groups: list[str]
    weight: float
    epochs: int
    fim_rate: float
    # One entry per (group, shard), in universe order.
    entry_group: np.ndarray      # int32 (E,) manifest group index
    entry_shard: np.ndarray      # int32 (E,) shard index within the group
    entry_start: np.ndarray      # int64 (E,) first universe row of the entry
    entry_rows: np.ndarray       # int64 (E,)
    num_rows: int = 0            # n_c, derived

    def __post_init__(self):
        self.num_rows = int(self.entry_rows.sum())

    def locate(self, r: int) -> int:
        """The entry holding universe row r."""
        return int(np.searchsorted(self.entry_start, r, side="right") - 1)


@dataclasses.dataclass(frozen=True)
class Skip:
    """Shard `shard` ('group:index') is quarantined from global step `from_step` on."""
    shard: str
    from_step: int

    def to_json(self) -> dict:
        return {"shard": self.shard, "from_step": self.from_step}


def parse_skips(skips, all_shards: set[tuple[str, int]]) -> list[Skip]:
    """Names or {'shard', 'from_step'} dicts -> validated, sorted, de-duplicated Skips.

    A name is 'group:index' (group may be an fnmatch pattern) or the shard's manifest
    path 'group/shard_00003.npy'; a bare name applies from step 0.
    """
    out = set()
    for s in skips:
        if isinstance(s, Skip):
            name, step = s.shard, s.from_step
        elif isinstance(s, str):
            name, step = s, 0
        elif isinstance(s, dict) and "shard" in s:
            name, step = s["shard"], int(s.get("from_step", 0))
        else:
            raise DataError(f"skip_shards: bad entry {s!r}; expected 'group:index' or "
                            "{'shard': ..., 'from_step': ...}")
        for key in expand_shard_name(name, all_shards):
            out.add(Skip(man_lib.shard_name(*key), max(0, int(step))))
    # Keep the earliest from_step per shard.
    first: dict[str, Skip] = {}
    for s in sorted(out, key=lambda s: (s.from_step, s.shard)):
        first.setdefault(s.shard, s)
    return sorted(first.values(), key=lambda s: (s.from_step, s.shard))


def expand_shard_name(name: str, all_shards: set[tuple[str, int]]) -> list[tuple[str, int]]:
    name = str(name)
    if "/" in name and name.endswith(".npy"):            # 'group/shard_00003.npy'
        grp, fname = name.rsplit("/", 1)
        try:
            idx = int(fname.removeprefix("shard_").removesuffix(".npy"))
        except ValueError:
            raise DataError(f"skip_shards: {name!r} is not a shard path") from None
        pats = (grp, idx)
    elif ":" in name:
        grp, idx_s = name.rsplit(":", 1)
        try:
            pats = (grp, int(idx_s))
        except ValueError:
            raise DataError(f"skip_shards: {name!r}: shard index must be an integer") \
                from None
    else:
        raise DataError(f"skip_shards: {name!r}; expected 'group:index'")
    hits = sorted(k for k in all_shards if k[1] == pats[1]
                  and fnmatch.fnmatchcase(k[0], pats[0]))
    if not hits:
        raise DataError(f"skip_shards: {name!r} names no shard in the manifest")
    return hits


class StageMixture:
    """The record index of one stage (see the module docstring)."""

    def __init__(self, cfg, manifest: dict, stage: int, skips=()):
        names = cfg_lib.stage_names(cfg)
        if not 1 <= stage <= len(names):
            raise DataError(f"stage {stage}: config has stages 1..{len(names)}")
        self.stage = stage
        self.seed = int(cfg.seed)
        scfg = cfg_lib.stage(cfg, stage)
        self.steps = int(scfg.steps)
        self.global_batch_size = int(cfg.train.global_batch_size)
        self.num_records = self.steps * self.global_batch_size
        self.group_names = sorted(manifest["groups"])
        gidx = {g: i for i, g in enumerate(self.group_names)}
        self.all_shards = {(g, int(sh["index"])) for g, gm in manifest["groups"].items()
                           for sh in gm["shards"]}

        self.components: list[Component] = []
        # Components in name order: the index must not depend on how the config was built
        # (a config file, or JSON read back from a manifest).
        for ci, (cname, comp) in enumerate(sorted(scfg.mixture.items())):
            field = f"stages.stage_{stage}.mixture.{cname}"
            groups = cfg_lib.match_groups(comp.groups, self.group_names)
            if not groups:
                raise DataError(f"{field}.groups: {comp.groups!r} matches no data group "
                                   f"in the manifest (have {self.group_names})")
            eg, ec, er = [], [], []
            for g in groups:
                for sh in sorted(manifest["groups"][g]["shards"], key=lambda c: c["index"]):
                    if int(sh["num_sequences"]) > 0:
                        eg.append(gidx[g])
                        ec.append(int(sh["index"]))
                        er.append(int(sh["num_sequences"]))
            if not er:
                raise DataError(f"{field}.groups: groups {groups} hold no train sequences")
            rows = np.asarray(er, np.int64)
            if rows.sum() >= 2**32:
                raise DataError(f"{field}: {rows.sum()} rows exceed index_shuffle's 2^32")
            self.components.append(Component(
                name=cname, index=ci, groups=groups, weight=float(comp.weight),
                epochs=int(comp.epochs), fim_rate=float(comp.fim_rate),
                entry_group=np.asarray(eg, np.int32), entry_shard=np.asarray(ec, np.int32),
                entry_start=np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64),
                entry_rows=rows))
        self.skips = parse_skips(skips, self.all_shards)
        self._perm = Permutations()
        self._build_skip_levels()
        for p in self.plan():
            if p["passes"] > p["epochs"] + 1e-9:
                log.warning("stage %d component %s: %d records need %.2f passes over its "
                            "%d rows, more than epochs=%d; later passes reshuffle",
                            stage, p["component"], p["records"], p["passes"], p["rows"],
                            p["epochs"])

    # ------------------------------------------------------------------ planning

    def shares(self) -> np.ndarray:
        w = np.asarray([c.weight for c in self.components], np.float64)
        return w / w.sum()

    def plan(self) -> list[dict]:
        """Per component: expected records in this stage and passes over its rows."""
        out = []
        for c, share in zip(self.components, self.shares()):
            recs = self.num_records * share
            out.append(dict(component=c.name, groups=c.groups, weight=c.weight,
                            share=float(share), rows=c.num_rows, records=int(round(recs)),
                            passes=recs / c.num_rows, epochs=c.epochs, fim_rate=c.fim_rate))
        return out

    # ------------------------------------------------------------------ skips

    def _build_skip_levels(self):
        """Per skip level (distinct from_step): first record, and per component the
        universe rows still allowed (as entry ids)."""
        self._levels = []   # (first_record, {component: (allowed_entries, cum_rows)})
        steps = sorted({s.from_step for s in self.skips})
        for lvl, step in enumerate(steps):
            skipped = {tuple(s.shard.rsplit(":", 1)) for s in self.skips if s.from_step <= step}
            skipped = {(g, int(i)) for g, i in skipped}
            per = {}
            for c in self.components:
                bad = np.asarray([(self.group_names[g], int(k)) in skipped
                                  for g, k in zip(c.entry_group, c.entry_shard)])
                if not bad.any():
                    continue
                ok = np.flatnonzero(~bad)
                if not len(ok):
                    raise DataError(f"skip_shards: skipping {sorted(skipped)} leaves "
                                       f"stage {self.stage} component {c.name} no data")
                per[c.index] = (bad, ok, np.cumsum(c.entry_rows[ok]))
            self._levels.append((step * self.global_batch_size, lvl + 1, per))

    def _substitute(self, c: Component, g: int, pos: int, epoch: int, entry: int):
        """(entry, row_in_entry) replacing record g's row if a skip active at g hits it."""
        level = None
        for first, lvl, per in self._levels:
            if first <= g:
                level = (lvl, per)
        if level is None or c.index not in level[1] or not level[1][c.index][0][entry]:
            return None
        lvl, (_, ok, cum) = level[0], level[1][c.index]
        n_ok = int(cum[-1])
        j = self._perm(pos % n_ok, n_ok,
                       _seed32(self.seed, _TAG_SKIP, self.stage, c.index, epoch, lvl))
        k = int(np.searchsorted(cum, j, side="right"))
        start = 0 if k == 0 else int(cum[k - 1])
        return int(ok[k]), j - start

    # ------------------------------------------------------------------ the index

    def component_seed(self, c: int) -> int:
        return _seed32(self.seed, _TAG_SHUFFLE, self.stage, c)

    def dataset(self) -> grain.MapDataset:
        """MapDataset of length num_records; element g is the record's provenance dict."""
        streams = [EpochShuffle(c.num_rows, self.component_seed(c.index)).map(_Tag(c.index))
                   for c in self.components]
        mixed = grain.MapDataset.mix(streams, [c.weight for c in self.components])
        return mixed[: self.num_records].map_with_index(_Resolve(self))

    def record(self, g: int, c: int, k: int, r: int) -> dict:
        comp = self.components[c]
        epoch, pos = divmod(k, comp.num_rows)
        entry = comp.locate(r)
        row = r - int(comp.entry_start[entry])
        sub = self._substitute(comp, g, pos, epoch, entry) if self._levels else None
        if sub is not None:
            entry, row = sub
        return dict(index=g, component=c, group=int(comp.entry_group[entry]),
                    shard=int(comp.entry_shard[entry]), row=int(row), epoch=int(epoch),
                    substituted=int(sub is not None))


class _Tag:
    """(stream index k, row r) -> (component, k, r); a class so grain workers pickle it."""

    def __init__(self, c: int):
        self.c = c

    def __call__(self, kr):
        return (self.c, *kr)


class _Resolve:
    def __init__(self, mix: StageMixture):
        self.mix = mix

    def __call__(self, g: int, ckr):
        return self.mix.record(int(g), *ckr)
