"""Real orbax saves and restores: round trip, retention, float32 on disk, crash safety."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from crystal.checkpoint import (CheckpointError, Checkpointer, checkpoint_dir,
                                find_checkpoint, open_checkpoint)


_TX = optax.adamw(1e-3)


@jax.jit
def _opt_state(params):
    opt = _TX.init(params)
    _, opt = _TX.update(jax.tree.map(jnp.ones_like, params), opt, params)
    return opt   # non-trivial moments


def make_state(seed=0, d=8):
    """A small train state: float32 params, optax AdamW state, step, rng key data."""
    r = np.random.default_rng(seed)
    params = {"embed": jnp.asarray(r.standard_normal((16, d), np.float32)), "layer": {
        "w_DxF": jnp.asarray(r.standard_normal((d, 2 * d), np.float32)),
        "b_F": jnp.full((2 * d,), float(seed))}}
    return {"params": params, "opt_state": _opt_state(params),
            "step": jnp.asarray(seed, jnp.int32),
            "rng": jnp.asarray(np.array([0, seed + 100], np.uint32))}


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_bitwise(tmp_path):
    state = make_state(3)
    data = {"loader": {"next_index": 1234, "epoch": 1}, "chunk": 2}
    meta = {"config": {"model": {"d_model": 8}}, "manifest_sha256": "ab" * 32, "stage": 1,
            "chunk": 2}
    with Checkpointer(checkpoint_dir(tmp_path), async_save=True) as ck:
        same = make_state(3)
        assert ck.save(10, same, data, meta)
        # save() returned: the arrays are on host, so the train step may donate them now.
        for x in jax.tree.leaves(same):
            x.delete()
        ck.wait()
        assert ck.latest_step() == 10
    ck = Checkpointer(checkpoint_dir(tmp_path))
    abstract = jax.eval_shape(lambda: state)
    got, got_data, got_meta = ck.restore(abstract_state=abstract)
    assert_bitwise_equal(got, state)   # optax namedtuple structure included
    assert got_data == data
    for k, v in meta.items():
        assert got_meta[k] == v
    assert got_meta["step"] == 10 and got_meta["release"] is False
    assert got_meta["crystal_version"] and "wallclock" in got_meta
    # No abstract state: host arrays, same bits.
    raw, _, _ = ck.restore(10)
    np.testing.assert_array_equal(np.asarray(raw["params"]["embed"]),
                                  np.asarray(state["params"]["embed"]))
    assert ck.read_meta(10)["chunk"] == 2
    # Saving an existing step (first step after a resume) is a no-op, not an error.
    assert ck.save(10, make_state(4), data, meta) is False
    got, _, _ = ck.restore(10, abstract)
    assert_bitwise_equal(got, state)
    ck.close()


def test_retention_keeps_releases(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep_recent=2, async_save=True)
    state = make_state(0)
    for step in range(1, 9):
        ck.save(step, state, {"i": step}, {"chunk": step // 3}, release=step in (3, 6))
    ck.wait()
    assert ck.all_steps() == [3, 6, 7, 8]
    assert ck.release_steps() == [3, 6]
    assert sorted(os.listdir(tmp_path / "ck")) == ["3", "6", "7", "8"]
    ck.close()
    # A new process (fresh manager) still knows the releases and keeps them.
    ck = Checkpointer(tmp_path / "ck", keep_recent=2)
    assert ck.release_steps() == [3, 6]
    for step in (9, 10, 11):
        ck.save(step, state, {}, {})
    ck.close()
    ck = Checkpointer(tmp_path / "ck")
    assert ck.all_steps() == [3, 6, 10, 11]
    moved = ck.set_aside(6, tmp_path / "aside")   # a rollback sets a release aside, whole
    assert ck.release_steps() == [3] and not (tmp_path / "ck" / "6").exists()
    assert moved == tmp_path / "aside" / "6" and (moved / "_CHECKPOINT_METADATA").is_file()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ck.set_aside(6, tmp_path / "aside")
    ck.close()


def test_params_float32_on_disk(tmp_path):
    state = make_state(1)
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(5, state, {}, {})
    ck.close()
    # Read the stored arrays with tensorstore directly, not through the Checkpointer.
    base = f"file://{tmp_path}/5/state"
    names = json.loads((tmp_path / "5/state/_METADATA").read_text())["tree_metadata"]
    param_names = [".".join(eval(k)) for k in names if eval(k)[0] == "params"]
    assert len(param_names) == 3
    for name in param_names:
        arr = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base,
                                                     "path": name}}).result()
        assert arr.dtype.numpy_dtype == np.float32, name
    w = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base,
                                               "path": "params.layer.w_DxF"}}).result()
    np.testing.assert_array_equal(w.read().result(), np.asarray(state["params"]["layer"]["w_DxF"]))
    # bf16 params are refused, naming the leaf; nothing is written.
    bad = dict(state, params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), state["params"]))
    ck = Checkpointer(tmp_path, async_save=False)
    with pytest.raises(CheckpointError, match=r"\['params'\]\['embed'\].*float32.*bfloat16"):
        ck.save(6, bad, {}, {})
    with pytest.raises(CheckpointError, match="typed PRNG key"):
        ck.save(6, dict(state, rng=jax.random.key(0)), {}, {})
    with pytest.raises(CheckpointError, match="'data'.*JSON"):
        ck.save(6, state, {"x": object()}, {})
    assert ck.all_steps() == [5]
    ck.close()


def test_restore_into_shardings(tmp_path):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    state = make_state(2)
    spec = {"embed": P("fsdp", "tensor"), "layer": {"w_DxF": P("fsdp", "tensor"),
                                                     "b_F": P("tensor")}}
    def shard(tree):
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, spec)
    state["params"] = shard(state["params"])
    ck = Checkpointer(tmp_path)
    ck.save(1, state, {}, {})
    ck.wait()
    # Restore the params onto a different layout than they were saved with.
    spec2 = {"embed": P(("fsdp", "tensor")), "layer": {"w_DxF": P(None, "fsdp"),
                                                        "b_F": P()}}
    repl = NamedSharding(mesh, P())
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=repl), state)
    abstract_state["params"] = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        state["params"], spec2)
    got, _, _ = ck.restore(1, abstract_state)
    assert got["params"]["layer"]["w_DxF"].sharding == NamedSharding(mesh, P(None, "fsdp"))
    assert got["params"]["embed"].sharding == NamedSharding(mesh, P(("fsdp", "tensor")))
    assert len(got["params"]["embed"].addressable_shards) == 8
    assert got["opt_state"][0].mu["embed"].sharding == repl
    assert_bitwise_equal(got, state)
    # Without a target, arrays land on the host CPU device whatever the saved layout was.
    raw, _, _ = ck.restore(1)
    assert raw["params"]["embed"].sharding == SingleDeviceSharding(jax.devices("cpu")[0])
    np.testing.assert_array_equal(raw["params"]["embed"], state["params"]["embed"])
    ck.close()


KILL_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from crystal.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1])
    small = {"params": {"w": jnp.full((4,), 1.0)}, "step": jnp.int32(1)}
    ck.save(1, small, {"pos": 1}, {}); ck.wait()
    big = {"params": {"w": jnp.full((4,), 2.0),
                      "big": jnp.arange(48 * 2 ** 20, dtype=jnp.float32).reshape(48, 1024, 1024)},
           "step": jnp.int32(2)}
    ck.save(2, big, {"pos": 2}, {})
    print("SAVING", flush=True)
    import time; time.sleep(120)
""")


def test_kill_mid_save_leaves_previous_checkpoint(tmp_path):
    d = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
    try:
        line = proc.stdout.readline()
        assert line.strip() == "SAVING"
        os.kill(proc.pid, signal.SIGKILL)   # the 192 MiB write is still in flight
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = sorted(os.listdir(d))
    assert "2" not in left and "1" in left
    assert any("tmp" in name for name in left), left   # the partial save is on disk ...
    assert find_checkpoint(d) == (d, 1)                 # ... and never picked up
    ck = Checkpointer(d)
    assert ck.latest_step() == 1 and ck.all_steps() == [1]
    state, data, meta = ck.restore()
    assert float(state["params"]["w"][0]) == 1.0 and data == {"pos": 1} and meta["step"] == 1
    assert sorted(os.listdir(d)) == ["1"]               # a writer cleans the tmp dir up
    # Training resumes and can checkpoint step 2 again.
    assert ck.save(2, {"params": {"w": jnp.full((4,), 3.0)}}, {}, {}, force=True)
    assert ck.latest_step() == 2 and (d / "2").is_dir()
    ck.close()


def test_find_checkpoint_and_init_from(tmp_path):
    work = tmp_path / "run"
    ck = Checkpointer(checkpoint_dir(work))
    state = make_state(5)
    ck.save(7, state, {}, {"stage": 1})
    ck.save(9, state, {}, {"stage": 2}, force=True)   # preemption path: blocks until durable
    ck.close()
    cdir = checkpoint_dir(work)
    assert find_checkpoint(work) == (cdir, 9)
    assert find_checkpoint(cdir) == (cdir, 9)
    assert find_checkpoint(cdir / "7") == (cdir, 7)
    ro, step = open_checkpoint(cdir / "7")
    assert step == 7 and ro.read_meta(step)["stage"] == 1
    got, _, _ = ro.restore(step, jax.eval_shape(lambda: state))
    assert_bitwise_equal(got, state)
    with pytest.raises(CheckpointError, match="read-only"):
        ro.save(11, state, {}, {})
    for bad in (tmp_path / "nothing", tmp_path):
        with pytest.raises(CheckpointError, match=f"^{bad}: no restorable checkpoint"):
            find_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Checkpointer(cdir).restore(8)
    with pytest.raises(CheckpointError, match="no finalized checkpoint"):
        Checkpointer(tmp_path / "empty").restore()
