"""crystal.sharding: meshes, the divisibility rule, sharded training equal to one device,
distributed settings parsing, and crystal.plan on a small config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from crystal import config as config_lib
from crystal import sharding
from crystal.sharding import ShardingError

HERE = Path(__file__).parent
CC_MESHES = ("8,1,1", "1,8,1", "1,1,8", "2,2,2", "1,4,2")
AMBER_MESHES = ("1,4,2", "1,1,8")


def tiny(name="crystalcoder_tiny", **mesh):
    cfg = config_lib.load(name)
    for k, v in mesh.items():
        cfg.mesh[k] = v
    return cfg


# ----------------------------------------------------------------------------- meshes


def test_mesh_from_config_and_presets():
    m = sharding.make_mesh(tiny(data=2, fsdp=2, tensor=2))
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # Presets fill their axis with the devices the other axes leave.
    assert sharding.mesh_shape(tiny(preset="gpu", tensor=4), 64, 8) == \
        {"data": 1, "fsdp": 16, "tensor": 4}
    assert sharding.mesh_shape(tiny(preset="tpu", data=2), 256) == \
        {"data": 2, "fsdp": 128, "tensor": 1}
    assert sharding.mesh_shape(tiny(preset="wafer"), 4) == {"data": 4, "fsdp": 1, "tensor": 1}
    # Tensor groups are consecutive devices: inside one process (one node on a GPU cluster).
    m = sharding.make_mesh(tiny(preset="gpu", tensor=2))
    assert [d.id for d in m.devices[0, 0]] == [0, 1]


@pytest.mark.parametrize("mesh,n,local,msg", [
    (dict(data=2, fsdp=2, tensor=1), 8, None, "= 4, but there are 8 devices"),
    (dict(preset="gpu", tensor=16), 64, 8, "inside a node"),
    (dict(preset="gpu", tensor=3), 8, 8, "does not divide 8 devices"),
    (dict(preset="wafer", tensor=2), 8, None, "data parallel only"),
    (dict(preset="tpu", fsdp=3), 8, None, "mesh.fsdp"),
])
def test_bad_meshes_name_the_field(mesh, n, local, msg):
    with pytest.raises(ShardingError, match=msg):
        sharding.mesh_shape(tiny(**mesh), n, local)


def test_parse_mesh_flag():
    assert sharding.parse_mesh_flag("data=1,fsdp=64,tensor=1") == \
        {"data": 1, "fsdp": 64, "tensor": 1}
    for bad in ("data=0", "pipe=2", "fsdp", "fsdp=x"):
        with pytest.raises(ShardingError, match="--mesh"):
            sharding.parse_mesh_flag(bad)


# ----------------------------------------------------------------------------- rules


def test_divisibility_rule():
    cfg = tiny(data=1, fsdp=2, tensor=4)
    mesh = sharding.make_mesh(cfg)
    r = sharding.rules(cfg)
    # heads=4 splits over tensor=4; heads=2 does not, so that dim replicates.
    assert sharding.spec_for(("embed", "heads", "head_dim"), (128, 4, 32), mesh, r) == \
        P("fsdp", "tensor", None)
    assert sharding.spec_for(("embed", "heads", "head_dim"), (128, 2, 32), mesh, r) == \
        P("fsdp", None, None)
    # Multi-axis rules keep the axes (in order) whose product still divides the dim, skip
    # size-1 axes, and never reuse a mesh axis within one array.
    r2 = dict(r, batch=("data", "fsdp", "tensor"), embed=("fsdp", "tensor"))
    assert sharding.spec_for(("batch",), (16,), mesh, r2) == P(("fsdp", "tensor"))
    assert sharding.spec_for(("batch",), (6,), mesh, r2) == P("fsdp")
    assert sharding.spec_for(("batch", "embed"), (16, 128), mesh, r2) == \
        P(("fsdp", "tensor"), None)
    with pytest.raises(ShardingError, match="no rule for logical axis 'seq'"):
        sharding.spec_for(("seq",), (8,), mesh, r)


def test_divisibility_fallbacks_are_reported():
    cfg = tiny(tensor=8)
    got = sharding.divisibility_fallbacks(cfg, sharding.make_mesh(cfg))
    assert "['layers']['block']['attn']['w_q']: dim 4 (heads) not split over tensor (8)" in got
    assert all("(heads)" in g for g in got) and len(got) == 7   # w_qkvo, b_qkv
    cfg = tiny(fsdp=4, tensor=2)
    assert sharding.divisibility_fallbacks(cfg, sharding.make_mesh(cfg)) == []


def test_bad_rules_name_the_field():
    cfg = tiny()
    cfg.mesh.rules.heads = "tensor,pipeline"
    with pytest.raises(ShardingError, match="mesh.rules.heads: unknown mesh axis 'pipeline'"):
        sharding.rules(cfg)


def test_batch_must_split_evenly():
    cfg = tiny(data=2, fsdp=4)
    cfg.train.global_batch_size, cfg.train.grad_accum = 12, 1
    with pytest.raises(ShardingError, match="train.global_batch_size"):
        sharding.batch_sharding(cfg, sharding.make_mesh(cfg))
    cfg.train.global_batch_size = 16
    s = sharding.batch_sharding(cfg, sharding.make_mesh(cfg))
    assert s.spec == P(("data", "fsdp")) and s.shard_shape((16, 128)) == (2, 128)


def test_state_shardings_follow_params_into_adam():
    from crystal import optim, train
    cfg = tiny(fsdp=4, tensor=2)
    mesh = sharding.make_mesh(cfg)
    opt = optim.make_optimizer(cfg, 1)
    sh = sharding.state_shardings(train.abstract_state(cfg, opt), cfg, mesh)
    w = sh.params["layers"]["block"]["mlp"]["w_up"]
    assert w.spec == P(None, "fsdp", "tensor")
    adam = sh.opt_state[1]
    assert adam.mu["layers"]["block"]["mlp"]["w_up"] == w
    assert adam.nu["embedding"] == sh.params["embedding"]
    assert sh.step.spec == P() and adam.count.spec == P() and sh.rng.spec == P()


def test_data_slice_single_process():
    cfg = tiny(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(cfg)
    assert sharding.data_slice(sharding.batch_sharding(cfg, mesh), 16) == (0, 1)


# ----------------------------------------------------------------------------- equivalence


def _run_equivalence(name, meshes, out):
    return subprocess.Popen([sys.executable, str(HERE / "mesh_equivalence.py"), name, str(out),
                             *meshes], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """Both tiny configs trained 3 steps on one device and on each mesh (two processes in
    parallel, one per config)."""
    d = tmp_path_factory.mktemp("equiv")
    procs = {n: (_run_equivalence(n, m, d / f"{n}.json"), d / f"{n}.json") for n, m in
             (("crystalcoder_tiny", CC_MESHES), ("amber_tiny", AMBER_MESHES))}
    out = {}
    for n, (p, path) in procs.items():
        log, _ = p.communicate(timeout=900)
        assert p.returncode == 0, log[-3000:]
        out[n] = json.loads(path.read_text())
    return out


def _expected_shards(fsdp, tensor):
    """Per-device shapes of crystalcoder_tiny's params by the default rules (vocab, heads,
    mlp -> tensor; embed -> fsdp) and the divisibility rule: 4 heads on tensor=8 stay whole."""
    f, t = fsdp, tensor
    h = 4 // t if 4 % t == 0 else 4
    return {
        "['embedding']": [2048 // t, 128 // f],
        "['final_norm']['scale']": [128],
        "['layers']['block']['attn']['w_q']": [2, 128 // f, h, 32],
        "['layers']['block']['attn']['b_q']": [2, h, 32],
        "['layers']['block']['attn']['w_o']": [2, h, 32, 128 // f],
        "['layers']['block']['attn']['b_o']": [2, 128 // f],
        "['layers']['block']['attn_norm']['bias']": [2, 128],
        "['layers']['block']['mlp']['w_gate']": [2, 128 // f, 344 // t],
        "['layers']['block']['mlp']['b_up']": [2, 344 // t],
        "['layers']['block']['mlp']['w_down']": [2, 344 // t, 128 // f],
        "['layers']['block']['mlp']['b_down']": [2, 128 // f],
    }


@pytest.mark.parametrize("name,mesh", [("crystalcoder_tiny", m) for m in CC_MESHES] +
                         [("amber_tiny", m) for m in AMBER_MESHES])
def test_mesh_trains_like_one_device(equivalence, name, mesh):
    r = equivalence[name]
    got = r["meshes"][mesh]
    assert got["devices"] == 8
    np.testing.assert_allclose(got["losses"], r["reference"]["losses"], rtol=1e-5, atol=0)
    for part in ("params", "mu", "nu"):
        assert got["diffs"][part] <= 1e-5, (part, got["diffs"])
    if got["init_diff"] is not None:   # the mesh whose state was created sharded
        assert got["init_diff"] == 0.0
    if name == "crystalcoder_tiny":
        _, fsdp, tensor = (int(x) for x in mesh.split(","))
        for leaf, shape in _expected_shards(fsdp, tensor).items():
            assert got["shards"]["params" + leaf] == shape, leaf
            assert got["shards"]["mu" + leaf] == shape, leaf


# ----------------------------------------------------------------------------- distributed


def test_distributed_settings_order():
    ds = sharding.distributed_settings
    assert ds({}, {}).mode == "single"
    s = ds(dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3), {
        "JAX_COORDINATOR_ADDRESS": "x:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    assert (s.mode, s.source, s.coordinator_address, s.num_processes, s.process_id) == \
        ("explicit", "flags", "10.0.0.1:1234", 4, 3)
    s = ds({}, {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"})
    assert (s.source, s.num_processes, s.process_id) == ("env", 2, 1)
    assert ds({"distributed": "off"}, {"JAX_COORDINATOR_ADDRESS": "h:9"}).mode == "single"


def test_distributed_settings_slurm_and_tpu_vm_go_to_jax_auto_detection():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[017-018,020],login1"}
    s = sharding.distributed_settings({}, env)
    assert (s.mode, s.source, s.coordinator_address, s.local_device_ids) == \
        ("auto", "slurm", None, None)
    # One task per node: the user names the local devices.
    s = sharding.distributed_settings({"local_device_ids": "0,1,2,3"}, env)
    assert s.local_device_ids == (0, 1, 2, 3)
    # A single-task allocation is one process.
    assert sharding.distributed_settings({}, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) \
        .mode == "single"


def test_distributed_settings_tpu_vm_and_errors():
    s = sharding.distributed_settings({}, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})
    assert (s.mode, s.source) == ("auto", "tpu_vm")
    with pytest.raises(ShardingError, match="--num_processes, --process_id"):
        sharding.distributed_settings({"coordinator_address": "h:1"}, {})
    with pytest.raises(ShardingError, match="JAX_PROCESS_ID"):
        sharding.distributed_settings({}, {"JAX_COORDINATOR_ADDRESS": "h:1",
                                           "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ShardingError, match="process id 2 is not in"):
        sharding.distributed_settings(dict(coordinator_address="h:1", num_processes=2,
                                           process_id=2), {})
    with pytest.raises(ShardingError, match="HOST:PORT"):
        sharding.distributed_settings(dict(coordinator_address="h", num_processes=2,
                                           process_id=0), {})
    with pytest.raises(ShardingError, match="SLURM_NTASKS: expected an integer"):
        sharding.distributed_settings({}, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "many"})


# ----------------------------------------------------------------------------- plan


def test_plan_small_config(tmp_path):
    """crystal.plan end to end on the tiny config: its numbers must agree with the layout."""
    out = tmp_path / "plan.json"
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    p = subprocess.run([sys.executable, "-m", "crystal.plan", "--config=configs/amber_tiny.py",
                        "--mesh=data=2,fsdp=2,tensor=1", "--per_device_batch=2",
                        "--device=a100-80gb,tpu-v4", f"--json_out={out}"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=HERE.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "per device:" in p.stdout and "a100-80gb" in p.stdout
    r = json.loads(out.read_text())
    assert r["devices"] == 4 and r["grad_accum"] == 2 and r["per_device_batch"] == 2
    pd = r["per_device"]
    # fsdp=2 halves every param with an embed dim: a bit over half the float32 bytes.
    full = r["params"] * 4
    assert full / 2 <= pd["params"] < 0.55 * full
    assert pd["optimizer"] >= 2 * pd["params"]          # Adam mu + nu
    assert pd["xla_arguments"] >= pd["params"] + pd["optimizer"]
    assert pd["activations"] > 0 and pd["xla_temporaries"] > 0
    # XLA's FLOPs (remat none) match the model count within 10%, once the chunked loss's
    # recomputed head forward (2 x V x d per token, crystal/train/loss.py) is added.
    m = config_lib.load("amber_tiny").model
    recompute = 2 * m.vocab_size * m.d_model * r["global_batch"] * r["seq_len"]
    assert abs(r["flops_per_step"] / (r["analytic_flops_per_step"] + recompute) - 1) < 0.1
    assert r["fits"]["a100-80gb"]["fits"] and set(r["fits"]) == {"a100-80gb", "tpu-v4"}


def test_plan_bad_input_is_one_line_error():
    p = subprocess.run([sys.executable, "-m", "crystal.plan", "--config=configs/amber_tiny.py",
                        "--mesh=data=3,fsdp=1,tensor=1", "--per_device_batch=2"],
                       capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("error: --per_device_batch=2")


@pytest.mark.skipif(not os.environ.get("CRYSTAL_PLAN_7B"),
                    reason="a 7B plan compiles for minutes; set CRYSTAL_PLAN_7B=1 (docs/scale.md)")
def test_plan_crystalcoder_7b_on_64_h200(tmp_path):
    out = tmp_path / "plan.json"
    p = subprocess.run([sys.executable, "-m", "crystal.plan",
                        "--config=configs/crystalcoder_7b.py", "--mesh=data=1,fsdp=64,tensor=1",
                        "--per_device_batch=33", f"--json_out={out}"],
                       capture_output=True, text=True, timeout=1800, cwd=HERE.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    pd = r["per_device"]
    assert r["params"] == 6_575_278_720 and r["grad_accum"] == 1
    assert 1.0 <= pd["params"] / (r["params"] * 4 / 64) < 1.01   # all but norms/biases split
    assert r["fits"]["h200"]["fits"] and not r["fits"]["a100-80gb"]["fits"]
