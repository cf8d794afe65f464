"""Makes `lm_eval --model crystal` work: registers crystal's lm-evaluation-harness model when
lm-eval loads its model registry.

lm-eval 0.4.13 finds models only in its own table (lm_eval.models.MODEL_MAPPING) and through
`@register_model` on classes someone has imported; it reads no entry points. So crystal
installs `crystal_lm_eval.pth` into site-packages (setup.py), which `site` runs at every
interpreter start: it imports this module, which imports nothing but the standard library
and adds one finder to `sys.meta_path`. The finder waits for `lm_eval.api.registry`; once
that module has run, it registers the name `crystal` as the lazy placeholder
"crystal.eval.harness:CrystalLM" (neither crystal nor JAX is imported until a run asks for
that model) and imports `lm_eval.models`, whose table lm-eval would otherwise load only into
an empty registry. Then the finder removes itself. Whatever goes wrong here is reported as a
warning and leaves lm-eval as it was.
"""

import importlib
import sys
import warnings

TRIGGER = "lm_eval.api.registry"
NAME, TARGET = "crystal", "crystal.eval.harness:CrystalLM"


def register(registry_module) -> None:
    """Adds `crystal` to lm-eval's model registry (idempotent), then lm-eval's own table."""
    registry = registry_module.model_registry
    if NAME not in registry:
        registry.register(NAME, target=TARGET)
    importlib.import_module("lm_eval.models")


class _Loader:
    """lm_eval.api.registry's own loader, then `register`. (No importlib.abc or
    importlib.util: importing them costs 5 to 30 ms, at every interpreter start.)"""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            register(module)
        except Exception as e:  # noqa: BLE001 - never break lm-eval itself
            warnings.warn(f"crystal: could not register the lm-eval model {NAME!r}: {e}")

    def __getattr__(self, name):     # get_source, get_filename, ... of the real loader
        return getattr(self.inner, name)


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER:
            return None
        uninstall()
        for finder in sys.meta_path:        # the spec the import would have found
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Adds the finder (from the .pth); if lm-eval's registry is already loaded, registers
    now."""
    if TRIGGER in sys.modules:
        register(sys.modules[TRIGGER])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


install()
