"""The library's error family: every message names the column, level, site or file at fault."""

__all__ = [
    "AmortizeError",
    "DataError",
    "ModelStructureError",
    "CheckpointError",
    "ConfigError",
]


class AmortizeError(Exception):
    """Base class of every error raised on purpose by amortize."""


class DataError(AmortizeError, ValueError):
    """Malformed or inconsistent data: names the column, level or group."""


class ModelStructureError(AmortizeError, ValueError):
    """A model the library cannot amortize: names the site or plate."""


class CheckpointError(AmortizeError):
    """A checkpoint that cannot be loaded: names the file and the mismatch."""


class ConfigError(AmortizeError, ValueError):
    """A bad experiment config: names the key and the file."""
