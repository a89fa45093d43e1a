"""Neural pieces: the bottom-up set encoder and the guide's conditional heads."""

from .encoder import Encoding, HierarchicalEncoder, RobustScaler, mlp, segment_mean
from .heads import GlobalHead, GroupHead, ParamScaler

__all__ = [
    "Encoding",
    "GlobalHead",
    "GroupHead",
    "HierarchicalEncoder",
    "ParamScaler",
    "RobustScaler",
    "mlp",
    "segment_mean",
]
