"""The one way a config field is declared: a default, a help string and optional range checks."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def documented(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a help string (``metadata["help"]``, used by ``sakd config-reference`` and the
    README) and optional range checks (``min``, ``max``, ``gt``, ``lt``, ``choices``) that
    :mod:`sakd.config.loader` applies when a recipe is read."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})
