"""amortize: neural amortized Bayesian inference for hierarchical Pyro models."""

from .amortizer import Amortizer  # noqa: E402
from .data import OBS, HierarchicalData  # noqa: E402
from .errors import (
    AmortizeError,
    CheckpointError,
    ConfigError,
    DataError,
    ModelStructureError,
    NonFiniteDrawsError,
    TrainingError,
)
from .importance import ImportanceSampledPosterior  # noqa: E402
from .local_sbc import LocalSBC  # noqa: E402
from .posterior import Posterior  # noqa: E402
from .simulate import StructureSampler, simulate
from .sources import PriorPredictive, Subsampled  # noqa: E402
from .structure import ModelStructure, trace_structure  # noqa: E402
from .train import Interrupted, TrainConfig  # noqa: E402
from .truncated import Truncated  # noqa: E402
from .version import __version__

__all__ = [
    "__version__",
    "OBS",
    "AmortizeError",
    "Amortizer",
    "Posterior",
    "ImportanceSampledPosterior",
    "LocalSBC",
    "PriorPredictive",
    "Subsampled",
    "Truncated",
    "Interrupted",
    "TrainConfig",
    "TrainingError",
    "NonFiniteDrawsError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HierarchicalData",
    "ModelStructure",
    "ModelStructureError",
    "StructureSampler",
    "simulate",
    "trace_structure",
]
