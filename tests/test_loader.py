"""The stage loader on prepared tiny data: mixture shares, determinism, exact O(1) resume
(also across a stage boundary), per-process sharding, shard quarantine, validation."""
import json
import time

import numpy as np
import pytest

from crystal import config as cfg_lib
from crystal.data import loader as loader_lib
from crystal.data.loader import StageLoader
from crystal.errors import DataError

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "source_id", "shard", "row", "group",
        "epoch", "index", "fim")


@pytest.fixture(scope="module")
def wd(loader_workdir):
    return loader_workdir


def tiny(**over):
    return cfg_lib.load("crystalcoder_tiny", {"data.sample_max_mb": 2.0, **over})


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in KEYS)


def take(loader, n):
    return [next(loader) for _ in range(n)]


class CountingReader:
    """Wraps the loader's reader to count which records it materialises."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, rec):
        self.seen.append(rec["index"])
        return self.inner(rec)


def counting(loader):
    loader.reader = CountingReader(loader.reader)
    loader._build()
    return loader.reader


def test_batch_layout(wd):
    ld = StageLoader(tiny(), wd, 2)
    b = next(ld)
    B, L = 16, 128
    assert ld.batch_size_per_process == B and ld.steps == 120
    for k in ("inputs", "targets", "segment_ids"):
        assert b[k].shape == (B, L) and b[k].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].shape == (B, L)
    for k in ("source_id", "shard", "row", "group"):
        assert b[k].shape == (B,) and b[k].dtype == np.int32
    # targets are inputs shifted by one: the rows are seq_len + 1 tokens.
    assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    names = sorted(json.loads((wd / "data" / "manifest.json").read_text())["groups"])
    stage2 = {g for g in names if g.startswith(("slimpajama.odd.", "starcoder."))}
    assert {names[i] for i in b["source_id"]} <= stage2
    assert b["segment_ids"].min() >= 0 and b["segment_ids"][:, 0].min() == 1


def test_rows_are_the_prepared_rows(wd):
    """Non-FIM rows are exactly the stored shard rows their provenance names."""
    ld = StageLoader(tiny(), wd, 1)
    man = json.loads((wd / "data" / "manifest.json").read_text())
    names = sorted(man["groups"])
    b = next(ld)
    for r in range(4):
        g = names[b["group"][r]]
        path = wd / "data" / man["groups"][g]["shards"][b["shard"][r]]["path"]
        stored = np.load(path, mmap_mode="r", allow_pickle=False)[b["row"][r]]
        assert np.array_equal(b["inputs"][r], stored[:-1])
        assert np.array_equal(b["targets"][r], stored[1:])


def test_mixture_token_shares_match_weights(wd):
    """Over 4000 samples, each component's share of trained tokens is its weight +- 1%."""
    cfg = tiny(**{"stages.stage_3.steps": 250})
    ld = StageLoader(cfg, wd, 3)
    ds = ld.global_batches()
    C = len(ld.mixture.components)
    tokens, fim, frags = np.zeros(C), np.zeros(C), np.zeros(C)
    for step in range(ld.steps):
        b = ds[step]
        np.add.at(tokens, b["component"], b["loss_mask"].sum(1))
        np.add.at(fim, b["component"], b["fim"])
        for r in range(len(b["row"])):      # documents in the stored row = FIM candidates
            stored = ld.reader.tokens(b["group"][r], b["shard"][r], b["row"][r])
            cuts = np.concatenate([[-1], np.flatnonzero(stored == 2), [len(stored)]])
            frags[b["component"][r]] += np.sum(np.diff(cuts) > 1)
    share = tokens / tokens.sum()
    assert np.all(np.abs(share - ld.mixture.shares()) < 0.01), (share, ld.mixture.shares())
    # FIM happens per document at the component's configured rate, and only there.
    rates = np.asarray([c.fim_rate for c in ld.mixture.components])
    assert set(rates) == {0.0, 0.3}
    assert np.all(fim[rates == 0] == 0)
    realised = fim[rates > 0].sum() / frags[rates > 0].sum()
    assert abs(realised - 0.3) < 0.03, realised


def test_deterministic_and_seeded(wd):
    a, b = StageLoader(tiny(), wd, 2), StageLoader(tiny(), wd, 2)
    for x, y in zip(take(a, 5), take(b, 5)):
        assert same(x, y)
    c = StageLoader(tiny(seed=1), wd, 2)
    assert not same(next(StageLoader(tiny(), wd, 2)), next(c))


def test_epochs_reshuffle_and_redraw_fim(wd):
    """A component's second pass is a new order with fresh FIM draws."""
    cfg = tiny(**{"stages.stage_3.steps": 600})
    ld = StageLoader(cfg, wd, 3)
    ds = ld.mixture.dataset()
    css = [c.index for c in ld.mixture.components if c.name == "css"][0]
    recs = [ds[g] for g in range(len(ds))]
    css_recs = [r for r in recs if r["component"] == css]
    n = ld.mixture.components[css].num_rows
    e0 = [(r["group"], r["shard"], r["row"]) for r in css_recs if r["epoch"] == 0]
    e1 = [(r["group"], r["shard"], r["row"]) for r in css_recs if r["epoch"] == 1]
    assert len(e0) == n and len(set(e0)) == n            # an epoch is a permutation
    assert e1[:20] != e0[:20]
    # Same stored row, two epochs: FIM drawn independently.
    ex = loader_lib.ExampleReader(wd, ld.manifest, ld.mixture, cfg.seed, 3,
                                  cfg.data.fim_spm_rate)
    diff = 0
    for r in css_recs[:n]:
        r1 = dict(r, epoch=1)
        diff += not np.array_equal(ex(r)["inputs"], ex(r1)["inputs"])
    assert diff > 0


def test_resume_is_exact_and_constant_time(wd):
    ref = StageLoader(tiny(), wd, 2)
    full = take(ref, 12)
    ld = StageLoader(tiny(), wd, 2)
    take(ld, 5)
    state = json.loads(json.dumps(ld.get_state()))       # through JSON, like a checkpoint
    assert len(json.dumps(state)) < 1000
    resumed = StageLoader(tiny(), wd, 2)
    seen = counting(resumed)
    resumed.set_state(state)
    for x, y in zip(take(resumed, 7), full[5:]):
        assert same(x, y)
    assert min(seen.seen) >= 5 * 16                      # nothing before the resume point

    # Far into the stage: restoring costs the same, and reads only what it yields.
    late = StageLoader(tiny(), wd, 2)
    seen = counting(late)
    t = time.perf_counter()
    late.set_state(dict(state, step=118))
    last = take(late, 2)
    elapsed = time.perf_counter() - t
    assert elapsed < 5.0 and min(seen.seen) >= 118 * 16
    assert same(last[1], StageLoader(tiny(), wd, 2).global_batch(119))
    with pytest.raises(StopIteration):
        next(late)


def test_resume_across_stage_boundary(wd):
    cfg = tiny(**{"stages.stage_1.steps": 4, "stages.stage_2.steps": 4})

    def run(interrupt_at=None):
        """Stage 1 then stage 2; optionally checkpoint+restart at global step k."""
        out, k = [], 0
        for stage in (1, 2):
            ld = StageLoader(cfg, wd, stage)
            while True:
                if interrupt_at == k:
                    state = json.loads(json.dumps(ld.get_state()))
                    ld = StageLoader(cfg, wd, stage)
                    ld.set_state(state)
                try:
                    out.append(next(ld))
                except StopIteration:
                    break
                k += 1
        return out

    full = run()
    assert len(full) == 8
    for k in (3, 4, 5):          # last step of stage 1, its end, first step of stage 2
        got = run(interrupt_at=k)
        assert len(got) == 8 and all(same(x, y) for x, y in zip(got, full))
    # A stage-1 state cannot be restored into stage 2.
    s1 = StageLoader(cfg, wd, 1)
    take(s1, 4)
    with pytest.raises(DataError, match="stage"):
        StageLoader(cfg, wd, 2).set_state(s1.get_state())


def test_processes_split_the_global_batch(wd):
    cfg = tiny()
    whole = StageLoader(cfg, wd, 3)
    P = 4
    parts = []
    for p in range(P):
        ld = StageLoader(cfg, wd, 3, process_index=p, process_count=P)
        assert ld.batch_size_per_process == 4
        seen = counting(ld)
        parts.append(take(ld, 3))
        # Process p reads only its rows of each global batch.
        assert {g % 16 // 4 for g in seen.seen} == {p}
    for step in range(3):
        g = whole.global_batch(step)
        cat = {k: np.concatenate([parts[p][step][k] for p in range(P)]) for k in KEYS}
        assert same(cat, g)
    with pytest.raises(DataError, match="divisible"):
        StageLoader(cfg, wd, 3, process_index=0, process_count=3)


def test_worker_processes_give_the_same_batches(wd):
    cfg = tiny(**{"data.loader_workers": 1})
    ld = StageLoader(cfg, wd, 2)
    ld.set_state(dict(ld.get_state(), step=7))
    got = take(ld, 3)
    ld.close()
    ref = StageLoader(tiny(), wd, 2)
    for i, x in enumerate(got):
        assert same(x, ref.global_batch(7 + i))


def test_skip_shard_is_deterministic_and_recorded(wd, tmp_path):
    # A private copy of the workdir (the ledger is written next to data/).
    import shutil
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").symlink_to(wd / "data")
    cfg = tiny()
    ref = StageLoader(cfg, run, 3)
    before = [ref.global_batch(s) for s in range(12)]
    names = ref.group_names
    py = names.index("starcoder.python")
    # The situation under test: a python shard whose rows steps 6..11 train on.
    k = int(np.bincount(np.concatenate([b["shard"][b["group"] == py] for b in before[6:]]),
                        minlength=4).argmax())
    shard = f"starcoder.python:{k}"
    assert sum(((b["group"] == py) & (b["shard"] == k)).sum() for b in before[6:]) > 0
    ld = StageLoader(cfg, run, 3)
    take(ld, 6)
    ld.skip_shard(shard)                                 # from the next step, 6
    after = take(ld, 6)
    for s, b in enumerate(after, start=6):
        hit = (b["group"] == py) & (b["shard"] == k)
        assert not hit.any()
        old = before[s]
        was = (old["group"] == py) & (old["shard"] == k)
        # Only the quarantined rows change; they are replaced by other python rows.
        assert np.array_equal(b["substituted"] == 1, was)
        assert np.array_equal(b["inputs"][~was], old["inputs"][~was])
        assert np.all(b["component"][was] == old["component"][was])
    state = ld.get_state()
    assert state["skips"] == [{"shard": shard, "from_step": 6}]
    ledger = json.loads((run / "skipped_shards.json").read_text())
    assert ledger == {"stage_3": state["skips"]}
    # A loader restored from a pre-skip checkpoint still honours the recorded skip ...
    fresh = StageLoader(cfg, run, 3)
    fresh.set_state(dict(state, step=6, skips=[]))
    assert same(next(fresh), after[0])
    # ... and steps before the skip are what they always were.
    assert same(fresh.global_batch(5), before[5])
    with pytest.raises(DataError, match="no shard"):
        ld.skip_shard("starcoder.python:99")
    shutil.rmtree(run)


def test_chunk_of_step(wd):
    ld = StageLoader(tiny(), wd, 1)
    chunks = [ld.chunk_of_step(s) for s in range(ld.steps)]
    assert chunks[0] == 0 and chunks[-1] == ld.num_chunks - 1 == 3
    assert chunks == sorted(chunks)
    assert np.bincount(chunks).tolist() == [ld.steps // ld.num_chunks] * ld.num_chunks
    # A stage shorter than data.num_chunks has one chunk per step.
    short = StageLoader(tiny(**{"stages.stage_1.steps": 3}), wd, 1)
    assert short.num_chunks == 3 and [short.chunk_of_step(s) for s in range(3)] == [0, 1, 2]


def test_val_batches(wd):
    ld = StageLoader(tiny(), wd, 3)
    v1, v2 = ld.val_batches(2), StageLoader(tiny(), wd, 3).val_batches(2)
    groups = sorted({g for c in ld.mixture.components for g in c.groups})
    assert sorted(v1) == groups
    for g in groups:
        assert len(v1[g]) == 2 and all(same(a, b) for a, b in zip(v1[g], v2[g]))
        assert np.all(v1[g][0]["source_id"] == ld.group_names.index(g))
        assert v1[g][0]["inputs"].shape == (16, 128) and v1[g][0]["fim"].sum() == 0


def test_bad_inputs_are_one_line_errors(wd, tmp_path):
    with pytest.raises(DataError, match="manifest"):
        StageLoader(tiny(), tmp_path, 1)
    with pytest.raises(DataError, match=r"stages.stage_3.mixture.python.groups"):
        StageLoader(tiny(**{"stages.stage_3.mixture.python.groups": "starcoder.cobol"}), wd, 3)
    with pytest.raises(DataError, match="seq_len"):
        StageLoader(tiny(**{"data.seq_len": 64}), wd, 1)
    ld = StageLoader(tiny(), wd, 1)
    with pytest.raises(DataError, match="data_sha256"):
        ld.set_state(dict(ld.get_state(), data_sha256="0" * 64))
    with pytest.raises(DataError, match="global_batch_size"):
        StageLoader(tiny(**{"train.global_batch_size": 32}), wd, 1).set_state(ld.get_state())
