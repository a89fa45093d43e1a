"""Neural pieces: summary statistics, the likelihood's data terms, the set encoder and the guide's heads."""

from .data_terms import DataTerm, data_terms
from .encoder import Encoding, HierarchicalEncoder, RobustScaler, mlp
from .heads import GlobalHead, GroupHead, ParamScaler
from .least_squares import segment_mean
from .statistics import STATISTICS_VERSION, DatasetStatistics, GroupStatistics, LevelStatistics, dataset_statistics

__all__ = [
    "STATISTICS_VERSION",
    "DataTerm",
    "DatasetStatistics",
    "Encoding",
    "GlobalHead",
    "GroupHead",
    "GroupStatistics",
    "HierarchicalEncoder",
    "LevelStatistics",
    "ParamScaler",
    "RobustScaler",
    "data_terms",
    "dataset_statistics",
    "mlp",
    "segment_mean",
]
