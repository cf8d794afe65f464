"""crystal's param tree in the two layer layouts the model builds (model.scan_layers).

Scanned: `layers/block/...` with a leading layers axis; unrolled: `layers_i/block/...`.
Converters work per layer, so they read and write through these (numpy, no compile).
"""

from __future__ import annotations

import numpy as np


def tree_map(f, *trees):
    """f over the leaves of nested dicts of the same structure."""
    if isinstance(trees[0], dict):
        return {k: tree_map(f, *(t[k] for t in trees)) for k in trees[0]}
    return f(*trees)


def leaves(tree) -> list:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in leaves(v)]
    return [tree]


def split_layers(params) -> list[dict]:
    """Per-layer param dicts (numpy), from the scanned or the unrolled layout."""
    if "layers" in params:
        stacked = params["layers"]["block"]
        n = leaves(stacked)[0].shape[0]
        return [tree_map(lambda x, i=i: np.asarray(x[i]), stacked) for i in range(n)]
    n = sum(1 for k in params if k.startswith("layers_"))
    return [tree_map(np.asarray, params[f"layers_{i}"]["block"]) for i in range(n)]


def join_layers(layers: list[dict], scan_layers: bool) -> dict:
    """The inverse of split_layers: the `layers` entries of a param tree."""
    if scan_layers:
        return {"layers": {"block": tree_map(lambda *xs: np.stack(xs), *layers)}}
    return {f"layers_{i}": {"block": layer} for i, layer in enumerate(layers)}


def with_layout(params, scan_layers: bool) -> dict:
    """The same params in the scanned or unrolled layout."""
    out = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layers_")}
    out.update(join_layers(split_layers(params), scan_layers))
    return out
