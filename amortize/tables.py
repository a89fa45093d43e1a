"""Long-format tables to index arrays: id columns coded per level, covariates per level, the response.

:meth:`HierarchicalData.from_frame <amortize.HierarchicalData.from_frame>` and ``from_csv`` call
:func:`encode_frame` and :func:`read_csv_columns`; every error is a DataError naming the column.
"""

from __future__ import annotations

import csv
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .values import OBS, as_float, is_missing, names_list

__all__ = ["encode_factors", "encode_frame", "read_csv_columns"]


def encode_frame(
    frame: Any,
    levels: Sequence[str],
    response: str | None = None,
    covariates: Mapping[str, Sequence[str]] | None = None,
    nested_ids: bool = False,
) -> dict[str, Any]:
    """The arguments of :class:`~amortize.HierarchicalData` for a long-format table (see ``from_frame``).

    Raises:
        DataError: naming the column, level or group at fault.
    """
    columns = _columns(frame)
    levels = names_list(levels, "levels")
    if not levels:
        raise DataError("levels: at least one grouping level (id column) is required")
    if response is not None and not isinstance(response, str):
        raise DataError(f"response: expected a column name, got {response!r}")
    if not isinstance(covariates or {}, Mapping):
        raise DataError(f"covariates: expected {{level: [columns]}}, got {covariates!r}")
    covariates = {lvl: names_list(cols, f"covariates of level '{lvl}'") for lvl, cols in (covariates or {}).items()}
    wanted = list(levels) + ([response] if response else [])
    for cols in covariates.values():
        wanted += cols
    for col in wanted:
        if col not in columns:
            raise DataError(f"column '{col}' is not in the data; columns are {sorted(columns)}")
    twice = sorted({c for c in wanted if wanted.count(c) > 1})
    if twice:
        raise DataError(f"column(s) {twice} used twice (as level, response or covariate)")
    n = len(columns[levels[0]])
    if n == 0:
        raise DataError("the data has no rows")
    labels: dict[str, list[Any]] = {}
    codes: dict[str, np.ndarray] = {}
    prev: list[Any] | None = None
    for lvl in levels:
        ids = [v.item() if isinstance(v, np.generic) else v for v in columns[lvl]]
        kinds: dict[Any, tuple[str, Any, int]] = {}
        for r, v in enumerate(ids):
            try:
                hash(v)
            except TypeError:
                raise DataError(
                    f"column '{lvl}': ids must be labels (numbers or strings), got {type(v).__name__} in row {r}"
                ) from None
            if is_missing(v):
                raise DataError(f"column '{lvl}': missing id in row {r}")
            first = kinds.setdefault(v, (_id_kind(v), v, r))
            if first[0] != _id_kind(v):  # 1, 1.0 and True are equal (one dict key) yet different labels
                raise DataError(
                    f"column '{lvl}': ids {first[1]!r} ({first[0]}, row {first[2]}) and {v!r} ({_id_kind(v)},"
                    f" row {r}) would be merged into one group; give the column one type of id"
                )
        key = [(*p, v) if isinstance(p, tuple) else (p, v) for p, v in zip(prev, ids)] if (nested_ids and prev) else ids
        uniq = _unique_in_order(key)
        lookup = {k: i for i, k in enumerate(uniq)}
        codes[lvl] = np.array([lookup[k] for k in key], dtype=np.int64)
        labels[lvl] = ["/".join(map(str, k)) if isinstance(k, tuple) else k for k in uniq]
        prev = key
    parents: dict[str, np.ndarray] = {}
    for above, lvl in zip(levels[:-1], levels[1:]):
        g = codes[lvl]
        par = np.full(len(labels[lvl]), -1, dtype=np.int64)
        par[g] = codes[above]
        mismatch = par[g] != codes[above]
        if mismatch.any():
            r = int(np.flatnonzero(mismatch)[0])
            grp = labels[lvl][g[r]]
            two = sorted({str(labels[above][c]) for c in codes[above][g == g[r]]})
            raise DataError(
                f"column '{lvl}': group {grp!r} has rows in {len(two)} different '{above}' groups"
                f" ({', '.join(two[:3])})"
                "; use nested_ids=True if ids repeat within parents"
            )
        parents[lvl] = par
    cov: dict[str, dict[str, np.ndarray]] = {}
    for lvl, cols in (covariates or {}).items():
        if lvl != OBS and lvl not in levels:
            raise DataError(f"covariates given for unknown level '{lvl}'; levels are {levels + [OBS]}")
        cov[lvl] = {}
        for col in cols:
            vals = _column_floats(columns, col).numpy()
            if lvl == OBS:
                cov[lvl][col] = vals
                continue
            g = codes[lvl]
            per = np.zeros(len(labels[lvl]))
            per[g] = vals
            bad = np.flatnonzero(per[g] != vals)
            if bad.size:
                raise DataError(
                    f"column '{col}': a '{lvl}' covariate must be constant within each '{lvl}' group;"
                    f" group {labels[lvl][g[bad[0]]]!r} has several values"
                )
            cov[lvl][col] = per
    y = None
    if response:
        y = _column_floats(columns, response)
    return {
        "levels": levels,
        "parents": parents,
        "group": codes[levels[-1]],
        "y": y,
        "covariates": cov,
        "labels": labels,
        "response": response or "y",
    }


def read_csv_columns(path: str) -> dict[str, list[Any]]:
    """The columns of a long-format CSV file (header row), cells parsed as int, float, str or None.

    Raises:
        DataError: naming the file (and the line) that cannot be read.
    """
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: empty file or no header row")
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    header = [h.strip() for h in header]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise DataError(f"{path}: column(s) {twice} appear more than once in the header")
    cols: dict[str, list[Any]] = {h: [] for h in header}
    for lineno, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {lineno} has {len(row)} fields, the header has {len(header)}")
        for h, v in zip(header, row):
            cols[h].append(_parse_cell(v))
    return cols


def _id_kind(v: Any) -> str:
    """What kind of label an id is: ``bool``, ``int``, ``float``, ``str``, or its type's name."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, numbers.Integral):
        return "int"
    return "float" if isinstance(v, float) else type(v).__name__


def _parse_cell(v: str) -> Any:
    v = v.strip()
    if v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() and "n" not in v.lower() else f


def _column_floats(columns: dict[str, Any], col: str) -> torch.Tensor:
    t = as_float(columns[col], f"column '{col}'", torch.float64)
    if t.dim() != 1:
        raise DataError(f"column '{col}': expected one number per row, got shape {tuple(t.shape)}")
    return t


def _columns(frame: Any) -> dict[str, Any]:
    if hasattr(frame, "columns") and hasattr(frame, "__getitem__") and not isinstance(frame, Mapping):
        names = [str(c) for c in frame.columns]
        twice = sorted({c for c in names if names.count(c) > 1})
        if twice:
            raise DataError(f"column(s) {twice} appear more than once in the data")
        cols = {name: np.asarray(frame[c]) for name, c in zip(names, frame.columns)}
    elif isinstance(frame, Mapping):
        cols = {str(k): v for k, v in frame.items()}
        if len(cols) != len(frame):
            raise DataError(f"column names collide once written as strings: {list(frame)}")
    else:
        raise DataError(f"expected a pandas DataFrame or a dict of columns, got {type(frame).__name__}")
    for k, v in cols.items():
        try:
            if isinstance(v, (str, bytes, Mapping, set, frozenset)):
                raise TypeError
            len(v)
        except TypeError:
            raise DataError(
                f"column '{k}': expected one value per row (a list or array), got {type(v).__name__}"
            ) from None
        if getattr(v, "ndim", 1) != 1:
            raise DataError(f"column '{k}': expected one value per row, got an array of shape {tuple(v.shape)}")
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"columns have different lengths: {lengths}")
    return cols


def _unique_in_order(keys: list[Any]) -> list[Any]:
    """The distinct ids, sorted: numbers by value, text in natural order (clinic_2 before clinic_10);
    ids of mixed kinds in the order they first appear."""
    seen: dict[Any, None] = {}
    for k in keys:
        seen.setdefault(k, None)
    uniq = list(seen)
    try:
        return sorted(uniq, key=_natural) if all(isinstance(k, str) for k in uniq) else sorted(uniq)
    except TypeError:
        return uniq


def _natural(text: str) -> tuple[tuple[int, Any], ...]:
    """Sort key of an id: its runs of digits compared as numbers (``clinic_10`` after ``clinic_9``)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def encode_factors(
    frame: Any,
    factors: Mapping[str, Sequence[str]],
    response: str | None = None,
    covariates: Mapping[str, Sequence[str]] | None = None,
    nested_ids: bool = False,
) -> dict[str, Any]:
    """The arguments of a crossed :class:`~amortize.HierarchicalData`: ``factors`` maps a name to its
    chain of id columns (outermost first), e.g. ``{"person": ["person"], "item": ["test", "item"]}``;
    each chain is coded as :func:`encode_frame` codes levels, and a level covariate goes with its factor.

    Raises:
        DataError: naming the factor, column, level or group at fault.
    """
    if not isinstance(factors, Mapping) or not factors:
        raise DataError(f"factors: expected {{name: [id columns]}}, got {factors!r}")
    chains = {name: names_list(cols, f"factor '{name}'") for name, cols in factors.items()}
    flat = [lvl for chain in chains.values() for lvl in chain]
    twice = sorted({lvl for lvl in flat if flat.count(lvl) > 1})
    if twice:
        raise DataError(f"factors: column(s) {twice} are in two factors")
    covariates = dict(covariates or {})
    stray = [lvl for lvl in covariates if lvl != OBS and lvl not in flat]
    if stray:
        raise DataError(f"covariates given for unknown level(s) {stray}; levels are {flat + [OBS]}")
    out: dict[str, Any] = {"levels": flat, "parents": {}, "group": {}, "labels": {}, "covariates": {}}
    for k, chain in enumerate(chains.values()):
        mine = {lvl: cols for lvl, cols in covariates.items() if lvl in chain or (k == 0 and lvl == OBS)}
        part = encode_frame(frame, chain, response if k == 0 else None, mine, nested_ids)
        out["parents"].update(part["parents"])
        out["group"][chain[-1]] = part["group"]
        out["labels"].update(part["labels"])
        out["covariates"].update(part["covariates"])
        if k == 0:
            out["y"], out["response"] = part["y"], part["response"]
    out["factors"] = list(chains.values())
    return out
