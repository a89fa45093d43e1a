"""Neural pieces: the summary statistics, the bottom-up set encoder and the guide's conditional heads."""

from .encoder import Encoding, HierarchicalEncoder, RobustScaler, mlp
from .heads import GlobalHead, GroupHead, ParamScaler
from .least_squares import segment_mean
from .statistics import STATISTICS_VERSION, DatasetStatistics, GroupStatistics, LevelStatistics, dataset_statistics

__all__ = [
    "STATISTICS_VERSION",
    "DatasetStatistics",
    "Encoding",
    "GlobalHead",
    "GroupHead",
    "GroupStatistics",
    "HierarchicalEncoder",
    "LevelStatistics",
    "ParamScaler",
    "RobustScaler",
    "dataset_statistics",
    "mlp",
    "segment_mean",
]
