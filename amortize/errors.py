"""The library's error family: every message names the column, level, site or file at fault.

Every error raised on purpose is an :class:`AmortizeError`; catch that to catch them all. When each
subclass is raised:

* :class:`DataError` (also a ``ValueError``): building a :class:`~amortize.HierarchicalData` from
  malformed input (NaN or infinite values, non-numeric values in a numeric column, values too large
  for the dtype, missing or unhashable ids, a group nested in two parents, ids that are not dense,
  missing or duplicated columns, empty data, columns of different lengths, an unreadable CSV, dates
  or times where numbers belong, ids such as 1, 1.0 and True that Python would merge), and a
  posterior asked of a dataset whose structure does not match the model (a level missing or extra, a
  covariate missing or extra, no response, a response of the wrong shape or dtype, a response outside
  the likelihood's support), before any network runs.
* :class:`ModelStructureError` (also a ``ValueError``): a model the library cannot amortize (names
  the site or plate, and what is wrong: a ``pyro.param`` inside it, a response without ``obs=``, a
  per-group latent outside its plate, a model that mixes the datasets of a batch).
* :class:`CheckpointError`: a checkpoint that cannot be written (disk full, no permission: the
  previous file is left intact) or loaded (missing, truncated, corrupted (checksum mismatch), of
  another format or library version, or of another model: sites, shapes, levels or covariates).
* :class:`ConfigError` (also a ``ValueError``): a bad experiment config or option (unknown key,
  wrong type, missing value, a number outside its range, invalid YAML, model that cannot be imported
  or exits at import, a resume that would change the network or seed, a run folder another process
  is writing); names the key and file.
* :class:`TrainingError`: training stopped because ``max_bad_steps`` consecutive steps had a
  non-finite loss or gradient, or because more than 1% of the prior-predictive simulations were
  dropped (names the site); the last checkpoint written is left intact.

A ``KeyboardInterrupt`` during training is not wrapped: the current step finishes, a checkpoint is
saved, and the interrupt propagates.
"""

__all__ = [
    "AmortizeError",
    "DataError",
    "ModelStructureError",
    "CheckpointError",
    "ConfigError",
    "TrainingError",
    "NonFiniteDrawsError",
    "ReferenceNotFoundError",
]


class AmortizeError(Exception):
    """Base class of every error raised on purpose by amortize."""


class DataError(AmortizeError, ValueError):
    """Malformed or inconsistent data: names the column, level or group."""


class ModelStructureError(AmortizeError, ValueError):
    """A model the library cannot amortize: names the site or plate."""


class CheckpointError(AmortizeError):
    """A checkpoint that cannot be written or loaded: names the file and the mismatch."""


class ConfigError(AmortizeError, ValueError):
    """A bad experiment config: names the key and the file."""


class TrainingError(AmortizeError):
    """Training stopped on repeated numerical faults: names the step and the checkpoint kept."""


class NonFiniteDrawsError(AmortizeError):
    """The posterior drew a NaN or infinite value: names the site (no public call returns such draws)."""


class ReferenceNotFoundError(AmortizeError, FileNotFoundError):
    """A file of the shared reference folder (data or ground truth of a shipped model) is missing: names the path."""
