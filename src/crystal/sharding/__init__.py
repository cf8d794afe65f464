"""Meshes, logical-axis rules, sharded state, steps and batches (`mesh.py`), and multi-host
start-up (`distributed.py`)."""

from crystal.errors import ShardingError
from crystal.sharding.distributed import (DistributedSettings, distributed_settings,
                                          initialize, settings_from_args)
from crystal.sharding.mesh import (MESH_AXES, PRESET_FILL, ShardedStep, abstract_with_shardings,
                                   activation_rules, batch_axes, batch_sharding,
                                   create_sharded_state, data_slice, divisibility_fallbacks,
                                   global_batch, make_mesh, mesh_context, mesh_from_flag,
                                   mesh_shape, param_specs, parse_mesh_flag, put_params,
                                   rules, shard_train_step, spec_for, state_shardings)

__all__ = ["MESH_AXES", "PRESET_FILL", "DistributedSettings", "ShardedStep", "ShardingError",
           "abstract_with_shardings", "activation_rules", "batch_axes", "batch_sharding",
           "create_sharded_state", "data_slice", "distributed_settings",
           "divisibility_fallbacks", "global_batch", "initialize", "make_mesh", "mesh_context",
           "mesh_from_flag", "mesh_shape", "param_specs", "parse_mesh_flag", "put_params",
           "rules", "settings_from_args", "shard_train_step", "spec_for", "state_shardings"]
