"""Device meshes, logical-axis rules, sharded state, steps and batches.

crystal runs on JAX's own multi-controller runtime (`jax.distributed`, started by
crystal.sharding.distributed) and XLA's SPMD partitioner: one program, jitted with explicit
shardings; nothing here launches processes.

Mesh: axes ("data", "fsdp", "tensor") from `cfg.mesh`, sized by the config or by a preset:

    preset   fill axis  device order                       meaning
    ''       -          process-major                      data x fsdp x tensor = #devices
    'gpu'    fsdp       process-major, tensor fastest      tensor parallel inside a node
                                                           (tensor | local devices), fsdp/data
                                                           across nodes
    'tpu'    fsdp       XLA's TPU torus order              fsdp over the whole slice
    'wafer'  data       process-major                      data parallel only (fsdp = tensor
                                                           = 1): weights replicated per device

With a preset, the fill axis takes whatever devices the other two axes leave (its config
value must be 1 or already that number).

Rules: `cfg.mesh.rules` maps each logical axis name the model uses (vocab, embed, heads,
head_dim, mlp, layers, norm; batch, length for activations) to comma-separated mesh axes.
The **divisibility rule** for params: a dim takes the listed mesh axes in order, skipping
any axis that is size 1, already used by an earlier dim of the same array, or whose size
(times the axes already taken for this dim) does not divide the dim; a dim left with no
axis is replicated. So heads=4 on tensor=8 is replicated, not an error. Batches are never
silently replicated: the micro-batch must divide over the batch axes, or it is an error.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from crystal import model as model_lib
from crystal.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor")
PRESET_FILL = {"gpu": "fsdp", "tpu": "fsdp", "wafer": "data"}
# Activation constraints resolve rules in this order: batch claims its mesh axes first, so
# an FSDP mesh shards activations by batch and leaves their embed dim whole.
ACTIVATION_PRIORITY = ("batch", "length")




# ----------------------------------------------------------------------------- meshes


def mesh_shape(cfg, num_devices: int, local_device_count: int | None = None) -> dict:
    """{'data': d, 'fsdp': f, 'tensor': t} for `num_devices`, after the preset's fill rule."""
    m = cfg.mesh
    sizes = {a: int(m[a]) for a in MESH_AXES}
    for a, v in sizes.items():
        if v <= 0:
            raise ShardingError(f"config field mesh.{a}: must be a positive integer, got {v}")
    preset = m.preset
    if preset:
        if preset not in PRESET_FILL:
            raise ShardingError(f"config field mesh.preset: unknown preset {preset!r}; "
                                f"expected one of {sorted(PRESET_FILL)}")
        fill = PRESET_FILL[preset]
        if preset == "wafer" and (sizes["fsdp"] != 1 or sizes["tensor"] != 1):
            raise ShardingError("config field mesh.preset: 'wafer' is data parallel only; "
                                f"mesh.fsdp={sizes['fsdp']} and mesh.tensor={sizes['tensor']}"
                                " must be 1")
        others = math.prod(v for a, v in sizes.items() if a != fill)
        if num_devices % others:
            raise ShardingError(f"config field mesh: the axes other than {fill} take {others} "
                                f"devices, which does not divide {num_devices} devices")
        want = num_devices // others
        if sizes[fill] not in (1, want):
            raise ShardingError(f"config field mesh.{fill}: preset {preset!r} fills it with "
                                f"{want} devices, but it is set to {sizes[fill]}")
        sizes[fill] = want
        if preset == "gpu" and local_device_count and local_device_count % sizes["tensor"]:
            raise ShardingError(f"config field mesh.tensor: preset 'gpu' keeps tensor "
                                f"parallelism inside a node, but tensor={sizes['tensor']} does "
                                f"not divide the {local_device_count} devices per process")
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ShardingError(f"config field mesh: data x fsdp x tensor = "
                            f"{sizes['data']} x {sizes['fsdp']} x {sizes['tensor']} = {total}, "
                            f"but there are {num_devices} devices (set the sizes or a preset)")
    return sizes


def make_mesh(cfg, devices=None) -> Mesh:
    """The run's mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    local = sum(1 for d in devices if d.process_index == devices[0].process_index)
    sizes = mesh_shape(cfg, len(devices), local)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if cfg.mesh.preset == "tpu" and devices[0].platform == "tpu":
        arr = mesh_utils.create_device_mesh(shape, devices)
    else:
        # Process-major, tensor fastest: a tensor group is consecutive devices of one process,
        # and each process holds a contiguous block of the batch (see data_slice).
        arr = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)
    return Mesh(arr, MESH_AXES)


def parse_mesh_flag(text: str) -> dict:
    """'data=1,fsdp=64,tensor=1' -> {'data': 1, 'fsdp': 64, 'tensor': 1} (a CLI's --mesh)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name not in MESH_AXES or not value.strip().isdigit() \
                or int(value) <= 0:
            raise ShardingError(f"--mesh={text}: expected comma-separated AXIS=N with AXIS in "
                                f"{MESH_AXES} and N > 0, got {part!r}")
        out[name] = int(value)
    return out


def mesh_from_flag(cfg, text: str) -> Mesh | None:
    """The mesh of a tool's `--mesh=data=D,fsdp=F,tensor=T` (axes not named are 1) over the
    first D x F x T devices, the config's rules mapping params to it; None for ''."""
    if not text:
        return None
    sizes = {a: 1 for a in MESH_AXES} | parse_mesh_flag(text)
    n = math.prod(sizes.values())
    if n > len(jax.devices()):
        raise ShardingError(f"--mesh={text}: {n} devices needed, {len(jax.devices())} here")
    c = cfg.copy_and_resolve_references()
    c.unlock()
    c.mesh.preset = ""
    for a, v in sizes.items():
        c.mesh[a] = v
    return make_mesh(c, jax.devices()[:n])


# ----------------------------------------------------------------------------- rules


def rules(cfg) -> dict[str, tuple[str, ...]]:
    """cfg.mesh.rules as {logical name: (mesh axes...)}; unknown mesh axes are an error."""
    out = {}
    for name, value in cfg.mesh.rules.items():
        if not isinstance(value, str):
            raise ShardingError(f"config field mesh.rules.{name}: must be a comma-separated "
                                f"string of mesh axes, got {value!r}")
        axes = tuple(a.strip() for a in value.split(",") if a.strip())
        for a in axes:
            if a not in MESH_AXES:
                raise ShardingError(f"config field mesh.rules.{name}: unknown mesh axis {a!r};"
                                    f" expected some of {MESH_AXES}")
        if len(set(axes)) != len(axes):
            raise ShardingError(f"config field mesh.rules.{name}: mesh axis listed twice")
        out[name] = axes
    return out


def spec_for(logical: tuple, shape: tuple, mesh: Mesh, rule_map: Mapping) -> P:
    """A PartitionSpec for one param under the divisibility rule (module docstring)."""
    if len(logical) != len(shape):
        raise ShardingError(f"logical axes {logical} do not match shape {shape}")
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        if name is None:
            out.append(None)
            continue
        if name not in rule_map:
            raise ShardingError(f"config field mesh.rules: no rule for logical axis {name!r}")
        taken: list[str] = []
        for a in rule_map[name]:
            size = mesh.shape[a]
            if size == 1 or a in used or dim % (math.prod(mesh.shape[t] for t in taken) * size):
                continue
            taken.append(a)
        used.update(taken)
        out.append(None if not taken else taken[0] if len(taken) == 1 else tuple(taken))
    return P(*out)


def param_specs(cfg, mesh: Mesh, shapes=None):
    """A pytree like the params with each leaf's PartitionSpec over `mesh`."""
    rule_map = rules(cfg)
    logical = model_lib.logical_axes(cfg)
    shapes = model_lib.abstract_params(cfg) if shapes is None else shapes
    return jax.tree.map(lambda lg, s: spec_for(tuple(lg), tuple(s.shape), mesh, rule_map),
                        logical, shapes, is_leaf=lambda x: isinstance(x, P))


def put_params(params, cfg, mesh: Mesh | None):
    """`params` (host or device arrays, in `cfg`'s layer layout) on the default device
    (`mesh` None) or sharded over `mesh` by the config's rules: how the sweep, the decoder
    and the lm-eval model place a checkpoint's params."""
    if mesh is None:
        return jax.device_put(params)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params,
                        param_specs(cfg, mesh))


def divisibility_fallbacks(cfg, mesh: Mesh) -> list[str]:
    """'path: dim D (logical) not split over axis (N)' for every param dim the rules wanted
    sharded but the divisibility rule kept whole: what to fix when a plan does not fit."""
    rule_map = rules(cfg)
    logical = model_lib.logical_axes(cfg)
    shapes = model_lib.abstract_params(cfg)
    specs = param_specs(cfg, mesh, shapes)
    out = []
    flat_l = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, P))[0]
    for (path, lg), s, sp in zip(flat_l, jax.tree.leaves(shapes),
                                 jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        for name, dim, got in zip(tuple(lg), s.shape, tuple(sp) + (None,) * len(s.shape)):
            got = () if got is None else (got,) if isinstance(got, str) else tuple(got)
            for a in rule_map.get(name, ()) if name else ():
                if mesh.shape[a] > 1 and a not in got and a not in _used(sp, got):
                    out.append(f"{jax.tree_util.keystr(path)}: dim {dim} ({name}) not split "
                               f"over {a} ({mesh.shape[a]})")
    return out


def _used(spec, mine) -> set:
    used = set()
    for e in spec:
        if e is None:
            continue
        for a in ((e,) if isinstance(e, str) else e):
            if a not in mine:
                used.add(a)
    return used


def _key_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def state_shardings(abstract_state, cfg, mesh: Mesh):
    """Shardings for a whole train state: every leaf whose key path ends with a param's path
    and has that param's shape (the params themselves, Adam's mu and nu, ...) is sharded as
    the param; everything else (step, counts, rng) is replicated."""
    shapes = model_lib.abstract_params(cfg)
    pspecs = param_specs(cfg, mesh, shapes)
    by_path = {}
    for (path, spec), s in zip(
            jax.tree_util.tree_flatten_with_path(pspecs, is_leaf=lambda x: isinstance(x, P))[0],
            jax.tree.leaves(shapes)):
        by_path[_key_names(path)] = (spec, tuple(s.shape))
    depths = sorted({len(k) for k in by_path}, reverse=True)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        names = _key_names(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for d in depths:
            hit = by_path.get(names[-d:]) if len(names) >= d else None
            if hit is not None and hit[1] == shape:
                return NamedSharding(mesh, hit[0])
        return replicated
    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_axes(cfg, mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in rules(cfg).get("batch", ()) if mesh.shape[a] > 1)


def batch_sharding(cfg, mesh: Mesh, rows: int | None = None) -> NamedSharding:
    """Sharding of every batch leaf: dim 0 (rows) over the batch rule's mesh axes.

    `rows` (default: the global batch) must split evenly over those axes in every
    micro-batch, or the step would silently compute on replicated data.
    """
    axes = batch_axes(cfg, mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    rows = int(cfg.train.global_batch_size) if rows is None else rows
    micro = rows // int(cfg.train.grad_accum)
    if micro % n:
        raise ShardingError(f"config field train.global_batch_size: a micro-batch of {micro} "
                            f"rows (global {rows} / grad_accum {cfg.train.grad_accum}) does "
                            f"not split over the batch axes {axes} ({n} shards)")
    return NamedSharding(mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None)))


def activation_rules(cfg) -> tuple:
    """The rules as flax's ((logical, mesh axes), ...) for nn.logical_axis_rules."""
    r = rules(cfg)
    order = [n for n in ACTIVATION_PRIORITY if n in r] + \
        [n for n in r if n not in ACTIVATION_PRIORITY]
    return tuple((n, (r[n] if len(r[n]) > 1 else r[n][0]) if r[n] else None) for n in order)


class mesh_context:
    """`with mesh_context(cfg, mesh):` makes the model's logical activation constraints
    resolve against `mesh` (jax.set_mesh + flax logical rules). Trace jitted code inside."""

    def __init__(self, cfg, mesh: Mesh):
        self._ctx = [jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules(cfg))]

    def __enter__(self):
        for c in self._ctx:
            c.__enter__()
        return self

    def __exit__(self, *exc):
        for c in reversed(self._ctx):
            c.__exit__(*exc)


# ----------------------------------------------------------------------------- state & step


def create_sharded_state(init_fn: Callable, cfg, mesh: Mesh, *args):
    """(state, shardings): `init_fn(*args)` run under jit with out_shardings, so every
    device materialises only its own shards (no full copy on any host)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, cfg, mesh)
    with mesh_context(cfg, mesh):
        state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying shardings: what AOT lowering and orbax restore take."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


class ShardedStep:
    """`step(state, batch)` jitted with explicit in/out shardings for the state (params,
    optimizer state, step, rng) and the batch; metrics come back replicated. The input
    state is donated: its buffers become the new state's."""

    def __init__(self, step_fn: Callable, cfg, mesh: Mesh, shardings, donate: bool = True):
        self.cfg, self.mesh, self.shardings = cfg, mesh, shardings
        self.batch_sharding = batch_sharding(cfg, mesh)
        self._jit = jax.jit(step_fn, in_shardings=(shardings, self.batch_sharding),
                            out_shardings=(shardings, NamedSharding(mesh, P())),
                            donate_argnums=(0,) if donate else ())

    def __call__(self, state, batch):
        with mesh_context(self.cfg, self.mesh):
            return self._jit(state, batch)

    def lower(self, state, batch):
        with mesh_context(self.cfg, self.mesh):
            return self._jit.lower(state, batch)


def shard_train_step(step_fn: Callable, cfg, mesh: Mesh, shardings, donate: bool = True):
    return ShardedStep(step_fn, cfg, mesh, shardings, donate)


# ----------------------------------------------------------------------------- batches


def data_slice(sharding: NamedSharding, global_rows: int,
               process_index: int | None = None) -> tuple[int, int]:
    """(index, count): this process needs rows [index*n, (index+1)*n) of every global batch,
    n = global_rows / count. The loader reads exactly that slice (StageLoader's
    process_index/process_count). count < process_count when processes share a slice
    (e.g. a tensor axis spanning hosts)."""
    pi = jax.process_index() if process_index is None else process_index
    devs = [d for d in sharding.mesh.devices.flat if d.process_index == pi]
    idx = sharding.devices_indices_map((global_rows,))
    rows = set()
    for d in devs:
        sl = idx[d][0]
        rows.update(range(*sl.indices(global_rows)))
    lo, hi = min(rows), max(rows) + 1
    n = hi - lo
    if len(rows) != n or global_rows % n or lo % n:
        raise ShardingError(f"the batch sharding gives process {pi} rows that are not one "
                            "aligned contiguous block; order the mesh process-major")
    return lo // n, global_rows // n


def global_batch(local_batch: Mapping, sharding: NamedSharding, global_rows: int) -> dict:
    """This process's rows of a batch (numpy) -> global jax Arrays laid out by `sharding`."""
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v,
                                                        (global_rows,) + v.shape[1:])
    return out
