"""Ranges of numeric options: one table per config dataclass, checked where the options are set.

:class:`~amortize.train.TrainConfig` checks its table when it is built (also from Python:
``Amortizer.fit(lr=-1)``); :func:`amortize.config.load_config` checks those and the config's own
when a YAML file is loaded, so a bad value ends the command before a run folder is made.

Example:
    >>> check_limits({"lr": -1.0}, {"lr": Limit(0, open_low=True)})  # doctest: +SKIP
    ConfigError: lr: must be > 0 and finite, got -1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["Limit", "check_limits"]


@dataclass(frozen=True)
class Limit:
    """An allowed range ``[low, high]`` (either end open, or absent); NaN is never inside.

    Attributes:
        low, high: the bounds (None: unbounded on that side).
        open_low, open_high: exclude the bound itself.
        finite: refuse infinities too.
        optional: None is allowed (the option has a "not set" meaning).
    """

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    finite: bool = True
    optional: bool = False

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is inside the range."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        v = float(value)
        if math.isnan(v) or (self.finite and math.isinf(v)):
            return False
        if self.low is not None and (v < self.low or (self.open_low and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.open_high and v == self.high)))

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '<='} {self.high:g}")
        text = " and ".join(parts) or "a number"
        return text + (" and finite" if self.finite and (self.low is None or self.high is None) else "")


def check_limits(values: Any, limits: Mapping[str, Limit], prefix: str = "") -> None:
    """Check every ``key`` of ``limits`` (dotted: ``nuts.target_accept``) on ``values`` (an object
    or a mapping).

    Raises:
        ConfigError: ``"<prefix><key>: must be <range>, got <value>"`` for the first value outside.
    """
    for key, limit in limits.items():
        value: Any = values
        for part in key.split("."):
            value = value[part] if isinstance(value, Mapping) else getattr(value, part)
        if not limit.allows(value):
            raise ConfigError(f"{prefix}{key}: must be {limit}, got {value!r}")
