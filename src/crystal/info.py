"""A read-only view of a config: parameter count, FLOPs per token and the param tree.

Shapes come from abstract evaluation (`jax.eval_shape` of the model's init), so a 7B
config prints in seconds without allocating 7B parameters; the count printed is the size
of that tree, cross-checked against crystal.metrics' closed-form count.

    python -m crystal.info --config=configs/amber_7b.py [--config.model.num_layers=4]
"""

from __future__ import annotations

import jax

from crystal import cli
from crystal import config as config_lib
from crystal import metrics as metrics_lib
from crystal import model as model_lib
from crystal import mup as mup_lib


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def param_rows(cfg) -> list[tuple[str, tuple, str, tuple, str]]:
    """(path, shape, dtype, logical axes, muP class) for every param, in tree order."""
    shapes = model_lib.abstract_params(cfg)
    axes = model_lib.logical_axes(cfg)
    flat_s = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    rows = []
    for (path, s), a in zip(flat_s, flat_a):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        rows.append((_path_str(path), tuple(s.shape), str(s.dtype), tuple(a),
                     mup_lib.param_class(keys)))
    return rows


def report(cfg) -> str:
    """The text `python -m crystal.info` prints."""
    m = cfg.model
    rows = param_rows(cfg)
    total = sum(_size(r[1]) for r in rows)
    breakdown = metrics_lib.param_breakdown(cfg)
    if breakdown["total"] != total:  # two independent counts; a mismatch is a bug
        raise AssertionError(f"param tree has {total:,} params but metrics.param_breakdown "
                             f"says {breakdown['total']:,}")
    fpt = metrics_lib.flops_per_token(cfg)
    T = cfg.data.seq_len
    lines = [
        f"config: {cfg.name}",
        f"variant: {m.norm}, {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads "
        f"x {config_lib.head_dim(cfg)}, ffn {m.ffn_dim}, vocab {m.vocab_size}, rotary "
        f"{config_lib.rotary_dims(cfg)}/{config_lib.head_dim(cfg)} ({m.rotary_pairing}), "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings, "
        f"{'muP' if cfg.mup.enabled else 'SP'}",
        f"parameters: {total:,} ({total / 1e9:.3f}B)",
        f"  embedding {breakdown['embedding']:,}, output head {breakdown['output_head']:,}, "
        f"layers {breakdown['layers']:,}, non-embedding {breakdown['non_embedding']:,}",
        f"FLOPs per token (training): {fpt:,.0f} ({fpt / 1e9:.2f} GFLOP)",
        "  formula: 6 * N_matmul + 12 * num_layers * d_model * seq_len",
        f"         = 6 * {breakdown['matmul']:,} + 12 * {m.num_layers} * {m.d_model} * {T}",
        "  N_matmul: attention + FFN projection weights and the V x d logit matmul (no "
        "embedding lookup, norms, biases);",
        "  12*L*d*T: QK^T and AV (non-causal count); forward 2 FLOPs/MAC, backward 2x forward",
        "param tree (path, shape, dtype, logical axes, muP class, size):",
    ]
    w = max(len(r[0]) for r in rows)
    for path, shape, dtype, axes, cls in rows:
        lines.append(f"  {path:<{w}}  {str(shape):<24} {dtype:<8} "
                     f"{'(' + ', '.join(axes) + ')':<36} {cls:<12} {_size(shape):>14,}")
    return "\n".join(lines)


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv=None):
    def body(args):
        print(report(args.cfg))
    return cli.run(body, doc=__doc__.split("\n\n")[0], config=cli.CONFIG_REQUIRED, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
