"""Checked conversions of user input to tensors: ids, numbers, names. Every error names what it read.

Used by :mod:`amortize.data` and :mod:`amortize.tables`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .errors import DataError

__all__ = [
    "OBS",
    "CovariatesByName",
    "as_index",
    "as_float",
    "magnitude_limit",
    "is_number",
    "is_missing",
    "names_list",
]

OBS = "obs"  # the name of the observation level (rows), used for covariates and indices


def as_index(values: Any, what: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):  # on any device: checked, and kept, on the CPU
        values = values.detach().cpu()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{what}: expected a 1-d index array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{what}: ids must be integers 0..G-1, got dtype {arr.dtype}")
    return torch.as_tensor(arr.astype(np.int64))


def magnitude_limit(dtype: torch.dtype) -> float:
    """The largest magnitude a value may have in ``dtype``: sums of squares over a million rows stay finite."""
    return torch.finfo(dtype).max ** 0.5 * 1e-3


def as_float(values: Any, what: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.double() if values.is_floating_point() else values  # numpy has no bfloat16
    dtype_in = getattr(values, "dtype", None)
    if not isinstance(dtype_in, np.dtype):
        try:
            dtype_in = np.asarray(values).dtype
        except (TypeError, ValueError):  # ragged: refused below with its own message
            dtype_in = None
    if dtype_in is not None and dtype_in.kind in "mM":  # numpy turns datetimes into nanosecond counts (1.58e18)
        raise DataError(
            f"{what}: dates or times (dtype {dtype_in}) are not numbers;"
            " convert them first (e.g. days since a start date)"
        )
    try:
        is_complex = np.iscomplexobj(values)
        arr = np.asarray(values, dtype=np.float64) if not is_complex else None
    except (TypeError, ValueError, OverflowError):
        bad = next((v for v in np.asarray(values, dtype=object).ravel() if not is_number(v)), None)
        raise DataError(f"{what}: non-numeric value {bad!r}") from None
    if arr is None:
        raise DataError(f"{what}: complex values are not supported")
    if not np.all(np.isfinite(arr)):
        flat = np.flatnonzero(~np.isfinite(arr.reshape(-1)))
        raise DataError(f"{what}: {len(flat)} value(s) are NaN or infinite (first at position {flat[0]})")
    limit = magnitude_limit(dtype)
    if np.abs(arr).max(initial=0.0) > limit:
        raise DataError(
            f"{what}: values of magnitude {np.abs(arr).max():.3g} are too large for {dtype} (limit {limit:.2g});"
            " rescale the column"
        )
    return torch.tensor(arr, dtype=dtype)


def is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def is_missing(v: Any) -> bool:
    """None, NaN, NaT, pandas.NA or a blank string."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return True
    try:
        return bool(v != v)
    except (TypeError, ValueError):  # pandas.NA: comparisons are ambiguous
        return True


def names_list(value: Any, what: str) -> list[str]:
    """A list of column or level names (a lone string is refused: it is not a list of names)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise DataError(f"{what}: expected a list of names, got {value!r}")
    for v in value:
        if not isinstance(v, str):
            raise DataError(f"{what}: names must be strings, got {v!r} ({type(v).__name__})")
    return list(value)


class CovariatesByName(Mapping):
    """A dataset's covariates by name, read from ``data.covariates[level]`` on each lookup (so a
    trace records which ones a model reads, see :func:`amortize.structure.trace_structure`)."""

    def __init__(self, data: Any) -> None:
        self._data = data

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._data.covariates[self._data.covariate_level[name]][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data.covariate_level)

    def __len__(self) -> int:
        return len(self._data.covariate_level)
