"""Simultaneous ECDF bands for SBC ranks: the core :mod:`amortize.ecdf`, re-exported for ``validate``."""

from __future__ import annotations

from ..ecdf import ECDFBand, ECDFTest, ecdf_band, ecdf_test, ranks_of

__all__ = ["ECDFBand", "ECDFTest", "ecdf_band", "ecdf_test", "ranks_of"]
