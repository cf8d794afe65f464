"""The three HF layouts by name, `--layout=auto`, and the layout a config.json describes."""

from __future__ import annotations

from crystal import model as model_lib
from crystal.errors import ConversionError
from crystal.interop import hf_classes, llm360
from crystal.interop.layouts import Layout

LAYOUTS: dict[str, Layout] = {x.name: x for x in (hf_classes.LLAMA, hf_classes.STABLELM,
                                                  llm360.LLM360)}
NAMES = tuple(LAYOUTS)


def get(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ConversionError(f"--layout={name}: expected auto or one of {', '.join(NAMES)}")
    return LAYOUTS[name]


def auto(cfg) -> Layout:
    """The exact layout for cfg's norm: llama for RMSNorm, llm360 for LayerNorm."""
    return get("llama" if cfg.model.norm == "rmsnorm" else "llm360")


def pick(cfg, name: str) -> Layout:
    """The layout `name` (or auto), after checking it holds cfg's model."""
    lay = auto(cfg) if name == "auto" else get(name)
    lay.holds(model_lib.ModelSpec.from_config(cfg))
    return lay


def of_config_json(hc: dict, where: str) -> Layout:
    """The layout a config.json describes, by its architectures (else model_type)."""
    archs = hc.get("architectures") or []
    for lay in LAYOUTS.values():
        if lay.architecture in archs or (not archs and hc.get("model_type") == lay.model_type):
            return lay
    known = ", ".join(x.architecture for x in LAYOUTS.values())
    raise ConversionError(f"{where}: architectures {archs!r} (model_type "
                          f"{hc.get('model_type')!r}) is no layout crystal reads ({known})")
