"""Validation: NUTS reference runs, metrics against reference posteriors, external ground truth loaders,
simulation-based calibration and Pareto-smoothed importance sampling."""

from . import reference
from .ecdf import ECDFBand, ecdf_band, ecdf_test
from .metrics import ReferenceMoments, compare, format_table, summarize, to_markdown
from .nuts import NUTSResult, run_nuts
from ..importance import PSISResult, psis
from .sbc import SBCResult, sbc

__all__ = [
    "run_nuts",
    "NUTSResult",
    "compare",
    "summarize",
    "format_table",
    "to_markdown",
    "ReferenceMoments",
    "reference",
    "sbc",
    "SBCResult",
    "ecdf_band",
    "ecdf_test",
    "ECDFBand",
    "psis",
    "PSISResult",
]
