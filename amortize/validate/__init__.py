"""Validation: NUTS reference runs, metrics against reference posteriors, external ground truth loaders,
simulation-based calibration and Pareto-smoothed importance sampling.

Functions here take objects (an amortizer, datasets, settings as values) and return results
(dataclasses, dicts, and the paths of the files they wrote); they never print. :mod:`.commands` and
:mod:`.draw_checks` assemble what the ``amortize`` commands compute (``bench_run`` loads its runs
through :mod:`amortize.rundir`); the command line (:mod:`amortize.cli`) parses, calls them and prints.
"""

from ..importance import PSISResult, psis
from . import reference
from .ecdf import ECDFBand, ecdf_band, ecdf_test
from .metrics import ReferenceMoments, compare, element_name, format_table, summarize, to_markdown
from .nuts import NUTSResult, run_nuts
from .sbc import SBCResult, sbc

__all__ = [
    "run_nuts",
    "NUTSResult",
    "compare",
    "element_name",
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
