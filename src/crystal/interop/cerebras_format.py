"""Reading and writing Cerebras Model Zoo params.yaml, and what crystal calls its data dirs.

Two formats (shared/reference/llm360.md):
- rel-1.9 flat, what LLM360 published for CrystalCoder's three phases: top-level `model`,
  `optimizer`, `runconfig`, `train_input`, `eval_input`;
- 2.x trainer: `trainer.init.{model, optimizer, schedulers, precision, loop, checkpoint}` and
  `trainer.fit.train_dataloader` (a list of such trainers is a multi-phase file).

`Params` records every key it hands out, so an import can list the ones it never used.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from crystal.errors import ConfigError

# SlimPajama's set names as Cerebras data dirs spell them (LLM360: ArXiv_train_packed...).
SLIMPAJAMA_SETS = {"arxiv": "ArXiv", "book": "Book", "c4": "C4", "commoncrawl": "CommonCrawl",
                   "github": "Github", "stackexchange": "StackExchange",
                   "wikipedia": "Wikipedia"}
HALVES = {"0": "even", "1": "odd"}     # LLM360's part0of2 / part1of2 halves
CRYSTAL_DIR = "crystal:"                # an export's data_dir: crystal:<component>:<groups>:...
_MISSING = object()


class Params:
    """One params.yaml (or one phase of a multi-phase file): values by dotted path, each
    read recorded; errors name the file and the key's line."""

    def __init__(self, data: dict, path: str, lines: dict, prefix: str = ""):
        self.data, self.path, self.lines, self.prefix = data, path, lines, prefix
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        line = self.lines.get(self.prefix + key)
        return f"{self.path}:{line}" if line else self.path

    def fail(self, key: str, msg: str):
        raise ConfigError(f"{self.where(key)}: {key}: {msg}")

    def has(self, key: str) -> bool:
        return self._lookup(key) is not _MISSING

    def get(self, key: str, default=_MISSING):
        """The value at dotted `key` (marked used, with everything under it)."""
        v = self._lookup(key)
        if v is _MISSING:
            if default is _MISSING:
                self.fail(key, "missing")
            return default
        self.used.add(key)
        return v

    def num(self, key: str, default=_MISSING) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, f"expected a number, got {v!r}")
        return float(v)

    def count(self, key: str, default=_MISSING) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            self.fail(key, f"expected a positive integer, got {v!r}")
        return v

    def _lookup(self, key: str):
        d = self.data
        for part in key.split("."):
            if isinstance(d, list) and part.isdigit() and int(part) < len(d):
                d = d[int(part)]
            elif isinstance(d, dict) and part in d:
                d = d[part]
            else:
                return _MISSING
        return d

    def unused(self, skip=()) -> list[str]:
        """Leaf keys never read (nor under a read key), minus those matching `skip`."""
        out = []

        def walk(d, path):
            if any(path == u or path.startswith(u + ".") for u in self.used):
                return
            items = (d.items() if isinstance(d, dict) else enumerate(d)
                     if isinstance(d, list) else ())
            if items and d:
                for k, v in items:
                    walk(v, f"{path}.{k}" if path else str(k))
            elif not any(re.fullmatch(s, path) for s in skip):
                out.append(path)
        walk(self.data, "")
        return sorted(out)


def _line_map(node, path="", out=None) -> dict:
    """Dotted key -> 1-based line, from the composed YAML node tree."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{path}.{k.value}" if path else str(k.value)
            out[key] = k.start_mark.line + 1
            _line_map(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, f"{path}.{i}", out)
    return out


def read(path) -> tuple[dict, dict]:
    """(data, line map) of a YAML file; bad YAML is a ConfigError naming file:line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    try:
        data, node = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: bad YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: not a params.yaml (a mapping of sections)")
    return data, _line_map(node)


def phases(path) -> list[Params]:
    """The phases of a params.yaml: one for rel-1.9 or a single 2.x trainer, several for a
    2.x `trainer:` list."""
    data, lines = read(path)
    trainer = data.get("trainer")
    if isinstance(trainer, list):
        out = []
        for i, item in enumerate(trainer):
            if not isinstance(item, dict) or not isinstance(item.get("trainer"), dict):
                raise ConfigError(f"{path}: trainer.{i}: expected {{trainer: {{...}}}}")
            out.append(Params(item["trainer"], str(path), lines, f"trainer.{i}.trainer."))
        return out
    if isinstance(trainer, dict):
        return [Params(trainer, str(path), lines, "trainer.")]
    return [Params(data, str(path), lines)]


def is_trainer_format(p: Params) -> bool:
    return p.prefix.startswith("trainer")


def dump(data: dict) -> str:
    """YAML text of a params dict: block style, keys sorted (same config, same bytes)."""
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


# ----------------------------------------------------------------------------- data dirs


def groups_of_dir(data_dir: str) -> tuple[str, str | None, float | None, int | None] | None:
    """(crystal groups pattern, component name, FIM rate, epochs; None where the dir does
    not say) for a Cerebras data dir, or None when crystal has no name for it.

    crystal:<name>:<groups>:fim=<r>:epochs=<e>   crystal's own export, exactly
    .../<Set>_train_packed_part0of2          slimpajama.even.RedPajama<Set> (part1of2: odd)
    .../<Set>_train_packed                   slimpajama.*.RedPajama<Set>
    .../StarCoder...                         starcoder.*
    .../<lang> under a starcoder/fim folder  starcoder.<lang>
    A folder named fim_<rate> gives the FIM rate.
    """
    m = re.fullmatch(re.escape(CRYSTAL_DIR) + r"([^:]+):([^:]+):fim=([\d.e-]+):epochs=(\d+)",
                     data_dir)
    if m:
        return m.group(2), m.group(1), float(m.group(3)), int(m.group(4))
    if data_dir.startswith(CRYSTAL_DIR):
        return None
    parts = [x for x in re.split(r"[\\/]+", data_dir) if x]
    if not parts:
        return None
    base, lower = parts[-1], [x.lower() for x in parts]
    fim = next((float(m.group(1)) for x in lower
                if (m := re.search(r"fim_(\d*\.?\d+)", x))), None)
    m = re.fullmatch(r"([A-Za-z0-9]+)_train_packed(?:_part([01])of2)?", base)
    if m and m.group(1).lower() in SLIMPAJAMA_SETS:
        half = HALVES[m.group(2)] if m.group(2) else "*"
        return (f"slimpajama.{half}.RedPajama{SLIMPAJAMA_SETS[m.group(1).lower()]}", None, fim,
                None)
    if base.lower().startswith("starcoder"):
        return "starcoder.*", None, fim, None
    if re.fullmatch(r"[a-z][a-z0-9+#_-]*", base) and any(
            "starcoder" in x or "fim" in x for x in lower[:-1]):
        return f"starcoder.{base}", None, fim, None
    return None


def dir_of_component(name: str, c) -> str:
    """The data_dir an export writes for crystal mixture component `c`: LLM360's own name
    where it is one SlimPajama (half-)set read once without FIM, else
    crystal:<name>:<groups>:fim=<rate>:epochs=<n> (what a params.yaml has no key for)."""
    m = re.fullmatch(r"slimpajama\.(even|odd|\*)\.RedPajama(\w+)", c.groups)
    plain = float(c.fim_rate) == 0.0 and int(c.epochs) == 1
    if m and plain and m.group(2) in SLIMPAJAMA_SETS.values() and name == f"RedPajama{m.group(2)}":
        part = {"even": "_part0of2", "odd": "_part1of2", "*": ""}[m.group(1)]
        return f"SlimPajama/{m.group(2)}_train_packed{part}"
    return f"{CRYSTAL_DIR}{name}:{c.groups}:fim={float(c.fim_rate)!r}:epochs={int(c.epochs)}"


def component_name(groups: str, taken: set) -> str:
    """A mixture component name for a groups pattern: its most specific part (RedPajamaC4,
    python, starcoder), made unique with the half (RedPajamaC4_odd)."""
    parts = groups.split(".")
    name = next((x for x in reversed(parts) if x != "*"), groups)
    if name in taken and len(parts) > 2:
        name = f"{name}_{parts[1].replace('*', 'all')}"
    while name in taken:
        name += "_"
    return name
