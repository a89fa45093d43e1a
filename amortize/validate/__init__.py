"""Validation: NUTS reference runs, metrics against reference posteriors, external ground truth loaders."""

from . import reference
from .metrics import ReferenceMoments, compare, format_table, summarize, to_markdown
from .nuts import NUTSResult, run_nuts

__all__ = [
    "run_nuts",
    "NUTSResult",
    "compare",
    "summarize",
    "format_table",
    "to_markdown",
    "ReferenceMoments",
    "reference",
]
