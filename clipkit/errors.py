"""Errors every component may raise about its own config (a leaf module: it imports nothing from clipkit)."""

from __future__ import annotations

import math
import signal
from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A user mistake in the config: names the dotted field, the value and what is wrong."""

    def __init__(self, key: str, value: Any, reason: str):
        self.key, self.value, self.reason = key, value, reason
        shown = value.value if isinstance(value, Enum) else value  # (a choice prints as typed: 'image')
        super().__init__(f"{key}={shown!r}: {reason}")


class UserError(Exception):
    """What the user's input, data, checkpoint or machine caused, not a bug: the CLI prints one line headed by
    ``kind`` (exit code 1, no traceback; ``CLIPKIT_DEBUG=1`` shows it). Every such error class derives from it."""

    kind = "error"


class Preempted(BaseException):
    """SIGTERM / SIGUSR1 arrived while the run was starting, or waiting for data with no batch within
    ``preempt.GRACE_S``: the run stops without writing a checkpoint (the last complete one resumes). A
    BaseException, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class NonFiniteError(UserError, FloatingPointError):
    """A NaN/inf gradient norm (from a NaN/inf loss or gradient); raised on every rank, before any update."""


class Choice(str, Enum):
    """A config field's allowed values, declared beside the field. Members are named by their own value, so
    Hydra/OmegaConf accept exactly the strings users type (``data.mode=resampled``) and name the allowed ones in
    the error; a member compares equal to its string and prints as it."""

    def __str__(self) -> str:
        return self.value


# dataclass field metadata: a word-valued field (a Choice with members such as ``false``): the CLI passes the
# override to Hydra quoted, so that ``train.compile=false`` reaches the field as the word, not as a YAML bool
WORD = {"word": True}
PATH = {"path": True}  # dataclass field metadata: the CLI passes this override to Hydra as a quoted string
# dataclass field metadata: the field (a whole section, if it is one) may differ between a checkpoint's config and
# the run that resumes it: how a run is watched, read or stopped, not what it trains on or computes
RESUMABLE = {"resumable": True}


def require(key: str, value: Any, ok: bool, reason: str) -> None:
    if not ok:
        raise ConfigError(key, value, reason)


def positive(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(f"{prefix}.{name}", value, math.isfinite(value) and value > 0, "must be a finite number > 0")


def non_negative(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(f"{prefix}.{name}", value, math.isfinite(value) and value >= 0, "must be a finite number >= 0")


def at_most(prefix: str, obj: Any, name: str, limit: float, why: str) -> None:
    value = getattr(obj, name)
    require(f"{prefix}.{name}", value, value <= limit, f"must be at most {limit:g}: {why}")
