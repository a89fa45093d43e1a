"""amortize: neural amortized Bayesian inference for hierarchical Pyro models."""

__version__ = "0.3.0"

from .amortizer import Amortizer  # noqa: E402
from .batch import PosteriorBatch  # noqa: E402
from .data import OBS, HierarchicalData  # noqa: E402
from .errors import AmortizeError, CheckpointError, ConfigError, DataError, ModelStructureError, TrainingError
from .posterior import Posterior  # noqa: E402
from .simulate import StructureSampler, simulate
from .structure import ModelStructure, trace_structure  # noqa: E402
from .subsample import LargePosterior, fit_subsampled  # noqa: E402
from .train import TrainConfig  # noqa: E402

__all__ = [
    "OBS",
    "AmortizeError",
    "Amortizer",
    "Posterior",
    "PosteriorBatch",
    "LargePosterior",
    "fit_subsampled",
    "TrainConfig",
    "TrainingError",
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
