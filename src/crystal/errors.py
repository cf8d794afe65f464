"""The errors a user can cause, under one base class.

Why one base: every `python -m crystal.X` runs through `crystal.cli`, which turns a
`CrystalError` into one line `error: <message>` and exit status 2, and lets anything else
(a bug) show its traceback. So a message here is written for the user: it names the file
(and line), the config field or the flag, and says what to do. Raise the most specific
class; catch `CrystalError` where any user mistake is handled the same way.
"""

from __future__ import annotations


class CrystalError(Exception):
    """A mistake the user can fix; the message is one line naming file, field or flag."""


class UsageError(CrystalError):
    """A bad command line: unknown flag, missing required flag, unparsable value."""


class ConfigError(CrystalError):
    """A bad config file, field or override; the message names the field."""


class ShardingError(ConfigError):
    """A mesh, rule or multi-host setting that cannot work; names the field or variable."""


class DataError(CrystalError):
    """Source files, prepared data, manifests, loader state or data chunks that cannot be
    used; the message names the file (and line or field)."""


class CheckpointError(CrystalError):
    """A checkpoint that cannot be saved, found or restored; names the path or leaf."""


class TrainError(CrystalError):
    """A run that cannot start or go on; the message says why and what to run instead."""


class MetricsError(CrystalError):
    """A metrics file or setting that cannot be used; the message names it."""


class ConversionError(CrystalError):
    """A conversion to or from another format (HF, Cerebras) that cannot be done
    faithfully; the message names the tensor, key or field."""


class EvalError(CrystalError):
    """An evaluation that cannot run as asked: code execution not allowed, a sandbox the
    kernel refuses, an unknown task; the message names the flag, task or isolation."""
