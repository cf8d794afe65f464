"""The one command-line runner: every `python -m crystal.X` is `cli.run(main, flags=...)`.

Why one runner: the same mistake gets the same answer from every tool. A user mistake (a
missing or broken config file, an unknown or ill-typed override, a bad flag, a missing
file or checkpoint) is a `CrystalError`; the runner prints it as one line `error: ...` on
stderr and exits 2, with no traceback, before or instead of writing anything. `--help`
prints the flags (with `--config` and `--config.SECTION.FIELD=VALUE` where a tool reads
a config) and exits 0.

Flags are `--name=value` or `--name value`; booleans are `--name`, `--noname` or
`--name=true|false`; `--` ends the flags (what follows goes to `args.extra`, e.g. Beam's
pipeline options). Config overrides are typed by the field they set (config.set_field).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
import textwrap
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from absl import logging as absl_logging

from crystal import config as config_lib
from crystal.errors import CrystalError, UsageError

CONFIG_REQUIRED, CONFIG_OPTIONAL, CONFIG_NONE = "required", "optional", "none"
_HELP = ("-h", "--help", "-help", "--helpfull")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag. type: str, int, float, bool or list (comma-separated)."""
    name: str
    help: str
    type: Any = str
    default: Any = None
    required: bool = False
    choices: tuple = ()
    positional: bool = False


def default_config() -> str:
    """The config a tool reads without --config: $CRYSTAL_CONFIG, else the tiny
    CrystalCoder (the README's main job)."""
    return os.environ.get("CRYSTAL_CONFIG", "configs/crystalcoder_tiny.py")


def _bool(text: str, what: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on", "t", "y"):
        return True
    if t in ("0", "false", "no", "off", "f", "n"):
        return False
    raise UsageError(f"{what}: expected true or false, got {text!r}")


def convert(flag: Flag, text: str):
    """A flag's text as its type; a bad value is a UsageError naming the flag."""
    what = f"--{flag.name}={text}"
    if flag.type is bool:
        return _bool(text, what)
    if flag.type is list:
        return [t.strip() for t in text.split(",") if t.strip()]
    try:
        value = flag.type(text)
    except ValueError:
        raise UsageError(f"{what}: expected {flag.type.__name__}") from None
    if flag.choices and value not in flag.choices:
        raise UsageError(f"{what}: expected one of {', '.join(map(str, flag.choices))}")
    return value


def _nearest(name: str, names) -> str:
    near = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean --{near[0]}?)" if near else ""


def parse(argv: Sequence[str], flags: Sequence[Flag], config: str = CONFIG_NONE,
          extra_args: bool = False) -> SimpleNamespace:
    """argv (without the program name) -> a namespace of flag values plus `config_file`
    (None if not given), `overrides` ({dotted field: text}) and `extra` (list)."""
    by_name = {f.name: f for f in flags if not f.positional}
    positional = [f for f in flags if f.positional]
    values: dict = {f.name: f.default for f in flags}
    given: set[str] = set()
    config_file, overrides, extra, pos = None, {}, [], []
    it = iter(list(argv))
    for a in it:
        if a == "--":
            extra += list(it)
            break
        if not a.startswith("-") or a == "-":
            pos.append(a)
            continue
        name, eq, text = a.lstrip("-").partition("=")
        takes_config = config != CONFIG_NONE
        if takes_config and (name == "config" or name.startswith("config.")):
            if not eq:
                text = next(it, None)
                if text is None:
                    raise UsageError(f"--{name}: needs a value (--{name}=VALUE)")
            if name == "config":
                config_file = text
            else:
                overrides[name[len("config."):]] = text
            continue
        flag = by_name.get(name)
        if flag is None and name.startswith("no") and not eq:
            neg = by_name.get(name[2:])
            if neg is not None and neg.type is bool:
                values[neg.name] = False
                given.add(neg.name)
                continue
        if flag is None:
            if extra_args:
                extra.append(a)
                continue
            known = list(by_name) + (["config"] if takes_config else [])
            raise UsageError(f"unknown flag --{name}{_nearest(name, known)}; see --help")
        if flag.type is bool and not eq:
            values[flag.name] = True
        else:
            if not eq:
                text = next(it, None)
                if text is None:
                    raise UsageError(f"--{name}: needs a value (--{name}=VALUE)")
            values[flag.name] = convert(flag, text)
        given.add(flag.name)
    if len(pos) > len(positional):
        raise UsageError(f"unexpected argument {pos[len(positional)]!r}; see --help")
    for f, text in zip(positional, pos):
        values[f.name] = convert(f, text)
        given.add(f.name)
    missing = [f for f in flags if f.required and f.name not in given]
    if missing:
        f = missing[0]
        raise UsageError(f"{f.name.upper() if f.positional else '--' + f.name} is required; "
                         "see --help")
    return SimpleNamespace(**values, config_file=config_file, overrides=overrides,
                           extra=extra, given=given)


def help_text(prog: str, doc: str, flags: Sequence[Flag], config: str) -> str:
    pos = " ".join(f.name.upper() for f in flags if f.positional)
    lines = [f"usage: {prog} [flags]{' ' + pos if pos else ''}", ""]
    lines += [doc.strip(), "", "flags:"]
    rows = []
    if config != CONFIG_NONE:
        dflt = default_config() if config == CONFIG_REQUIRED else "the run's recorded config"
        rows.append(("--config=FILE", f"config file (default: {dflt})"))
        rows.append(("--config.SECTION.FIELD=VALUE",
                     "override one config field, e.g. --config.model.num_layers=4"))
    for f in flags:
        kind = {bool: "", int: "=INT", float: "=FLOAT", list: "=A,B,..."}.get(f.type, "=VALUE")
        left = f.name.upper() if f.positional else f"--{f.name}{kind}"
        right = f.help + ("" if f.default in (None, "", False) or f.positional
                          else f" (default: {f.default})") + (" [required]" if f.required
                                                               else "")
        rows.append((left, right))
    rows.append(("-h, --help", "show this help and exit"))
    w = min(max(len(r[0]) for r in rows), 34)
    for left, right in rows:
        body = textwrap.wrap(right, width=max(40, 96 - w)) or [""]
        if len(left) > w:
            lines.append(f"  {left}")
            left = ""
        lines += [f"  {left:<{w}}  {body[0]}"] + [f"  {'':<{w}}  {b}" for b in body[1:]]
    return "\n".join(lines)


def _prog(main: Callable) -> str:
    mod = main.__module__
    if mod == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        mod = spec.name if spec is not None else os.path.basename(sys.argv[0])
    return f"python -m {mod.removesuffix('.__main__')}"


def error_line(e: BaseException) -> str:
    """`error: <message>` on one line, whitespace runs (newlines too) collapsed."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"error: {msg}"


def _quiet_logs():
    """crystal's own INFO lines as plain messages; orbax/absl at WARNING (orbax logs every
    save at INFO)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_config(args, default: str | None = None):
    """The validated config of `args`: --config (or `default`), then the overrides."""
    return config_lib.load(args.config_file or default or default_config(), args.overrides)


def run(main: Callable[[SimpleNamespace], int | None], *, doc: str,
        flags: Sequence[Flag] = (), config: str = CONFIG_NONE, argv=None,
        extra_args: bool = False, prog: str | None = None) -> int:
    """Parses argv, loads the config (config='required'), calls main(args); returns the exit
    status for `raise SystemExit(...)` (tests call a tool's main() and read it).

    main's return value is the exit status (None: 0). A CrystalError anywhere (parsing,
    the config, main) is one line `error: ...` and status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or _prog(main)
    head = argv[:argv.index("--")] if "--" in argv else argv
    if any(a in _HELP for a in head):
        print(help_text(prog, doc, flags, config))
        return 0
    _quiet_logs()
    try:
        args = parse(argv, flags, config, extra_args)
        if config == CONFIG_REQUIRED:
            args.cfg = load_config(args)
        elif config == CONFIG_OPTIONAL:
            args.cfg = load_config(args) if args.config_file else None
        code = main(args)
    except CrystalError as e:
        print(error_line(e), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    return int(code or 0)
