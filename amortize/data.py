"""Hierarchical datasets in long format: one row per observation, one id per level.

A :class:`HierarchicalData` holds the levels (outermost first), for every level below the
first a dense index of each group's parent, the innermost group of every observation, the
response, and covariates that live at a level or at the observations. The response may
carry a leading batch dimension ``[B, N]``: B datasets that share one structure.

Example:
    >>> import amortize as am
    >>> data = am.HierarchicalData.from_frame(
    ...     {"school": [0, 0, 1, 1, 1], "y": [1.0, 2.0, 0.5, 0.1, 0.3]},
    ...     levels=["school"], response="y")
    >>> data.size("school"), data.n_obs
    (2, 5)
"""

from __future__ import annotations

import csv
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import DataError

__all__ = ["HierarchicalData", "OBS"]

OBS = "obs"  # the name of the observation level (rows), used for covariates and indices


def _as_index(values: Any, what: str) -> torch.Tensor:
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


def _as_float(values: Any, what: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.double() if values.is_floating_point() else values  # numpy has no bfloat16
    kind = getattr(getattr(values, "dtype", None), "kind", None) or np.asarray(values).dtype.kind
    if kind in "mM":  # numpy turns datetimes into nanosecond counts (1.58e18) without a word
        raise DataError(
            f"{what}: dates or times (dtype {getattr(values, 'dtype', None) or np.asarray(values).dtype}) are not"
            " numbers; convert them first (e.g. days since a start date)"
        )
    try:
        is_complex = np.iscomplexobj(values)
        arr = np.asarray(values, dtype=np.float64) if not is_complex else None
    except (TypeError, ValueError, OverflowError):
        bad = next((v for v in np.asarray(values, dtype=object).ravel() if not _is_number(v)), None)
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


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _id_kind(v: Any) -> str:
    """What kind of label an id is: ``bool``, ``int``, ``float``, ``str``, or its type's name."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, numbers.Integral):
        return "int"
    return "float" if isinstance(v, float) else type(v).__name__


def _is_missing(v: Any) -> bool:
    """None, NaN, NaT, pandas.NA or a blank string."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return True
    try:
        return bool(v != v)
    except (TypeError, ValueError):  # pandas.NA: comparisons are ambiguous
        return True


def _names(value: Any, what: str) -> list[str]:
    """A list of column or level names (a lone string is refused: it is not a list of names)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise DataError(f"{what}: expected a list of names, got {value!r}")
    for v in value:
        if not isinstance(v, str):
            raise DataError(f"{what}: names must be strings, got {v!r} ({type(v).__name__})")
    return list(value)


class HierarchicalData:
    """A nested (ragged) dataset: levels outermost first, observations as rows.

    Args:
        levels: level names, outermost first, e.g. ``["district", "school"]``.
        parents: for every level but the first, an index ``[G_level]`` of each group's parent
            group in the level above.
        group: ``[N]`` index of each observation's group at the innermost level.
        y: response, ``[N]`` or ``[B, N]`` (B datasets sharing this structure), or None.
        covariates: ``{level: {name: values}}``; ``level`` is a level name (values ``[G_level]``)
            or ``"obs"`` (values ``[N]``). Covariate names are unique across levels.
        labels: optional original group ids per level (used for coordinates in exports).
        response: name of the response column (for messages and exports).

    Raises:
        DataError: naming the level or column at fault.
    """

    def __init__(
        self,
        levels: Sequence[str],
        parents: Mapping[str, Any],
        group: Any,
        y: Any = None,
        covariates: Mapping[str, Mapping[str, Any]] | None = None,
        labels: Mapping[str, Sequence[Any]] | None = None,
        response: str = "y",
        dtype: torch.dtype | None = None,
    ) -> None:
        dtype = dtype or torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DataError(f"dtype: expected a floating-point torch dtype, got {dtype!r}")
        self.levels = tuple(_names(levels, "levels"))
        self.response = response
        self._check_levels()
        self.group = _as_index(group, "observations' innermost group index")
        if not isinstance(parents, Mapping):
            raise DataError(f"parents: expected {{level: parent index}}, got {type(parents).__name__}")
        stray = [lvl for lvl in parents if lvl not in self.levels[1:]]
        if stray:
            raise DataError(f"parents given for {stray}, which are not inner levels of {list(self.levels)}")
        self.parents = {
            lvl: _as_index(parents[lvl], f"level '{lvl}': parent index") for lvl in self.levels[1:] if lvl in parents
        }
        self.labels = {lvl: list(labels[lvl]) for lvl in labels} if labels else {}
        self._sizes = self._infer_sizes()
        self.covariates: dict[str, dict[str, torch.Tensor]] = {}
        self.covariate_level: dict[str, str] = {}
        if not isinstance(covariates or {}, Mapping):
            raise DataError(f"covariates: expected {{level: {{name: values}}}}, got {type(covariates).__name__}")
        for lvl, cols in (covariates or {}).items():
            if lvl != OBS and lvl not in self.levels:
                raise DataError(f"covariates given for unknown level '{lvl}'; levels are {list(self.levels) + [OBS]}")
            if not isinstance(cols, Mapping):
                raise DataError(f"covariates of level '{lvl}': expected {{name: values}}, got {type(cols).__name__}")
            self.covariates[lvl] = {}
            for name, values in cols.items():
                if name in self.covariate_level:
                    raise DataError(
                        f"covariate '{name}' is given at two levels ('{self.covariate_level[name]}', '{lvl}')"
                    )
                t = _as_float(values, f"covariate '{name}' (level '{lvl}')", dtype)
                want = self.n_obs if lvl == OBS else self.size(lvl)
                if t.dim() != 1 or t.shape[0] != want:
                    raise DataError(
                        f"covariate '{name}' (level '{lvl}'): expected {want} values, got shape {tuple(t.shape)}"
                    )
                self.covariates[lvl][name] = t
                self.covariate_level[name] = lvl
        self.y = None
        if y is not None:
            self.y = self._check_response(_as_float(y, f"response '{response}'", dtype))
        self._index_cache: dict[tuple[str, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ validation
    def _check_response(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() not in (1, 2) or y.shape[-1] != self.n_obs:
            raise DataError(
                f"response '{self.response}': expected shape [N] or [B, N] with N={self.n_obs}, got {tuple(y.shape)}"
            )
        return y

    def _check_levels(self) -> None:
        if not self.levels:
            raise DataError("levels: at least one grouping level is required")
        if len(set(self.levels)) != len(self.levels):
            raise DataError(f"levels: names must be unique, got {list(self.levels)}")
        for lvl in self.levels:
            if not isinstance(lvl, str) or not lvl or lvl == OBS:
                raise DataError(f"levels: invalid level name {lvl!r} ('{OBS}' is reserved for observations)")

    def _infer_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        children: list[tuple[str, torch.Tensor]] = [(lvl, self.parents.get(lvl)) for lvl in self.levels[1:]]
        children.append((OBS, self.group))
        for (child, idx), lvl in zip(children, self.levels):
            if idx is None:
                raise DataError(f"level '{child}': parent index into level '{lvl}' is missing")
            if idx.numel() == 0:
                raise DataError(f"level '{lvl}': no groups (empty data)")
            if int(idx.min()) < 0:
                raise DataError(f"level '{child}': negative index into level '{lvl}'")
            n = len(self.labels[lvl]) if lvl in self.labels else int(idx.max()) + 1
            if int(idx.max()) >= n:
                raise DataError(
                    f"level '{child}': index {int(idx.max())} points to no group of level '{lvl}' (it has {n})"
                )
            if n > idx.numel():  # more groups than members: some are empty (found without an [n] array)
                present = torch.unique(idx)
                gaps = torch.nonzero(present != torch.arange(len(present)))
                g = int(gaps[0]) if len(gaps) else len(present)
                label = self.labels[lvl][g] if lvl in self.labels else g
                raise DataError(
                    f"level '{lvl}': group {label!r} has no {'observations' if child == OBS else child + ' groups'}"
                    f" ({n} groups for {idx.numel()} members; ids must be dense 0..G-1 with no gaps)"
                )
            counts = torch.bincount(idx, minlength=n)
            if bool((counts == 0).any()):
                g = int(torch.nonzero(counts == 0)[0])
                label = self.labels[lvl][g] if lvl in self.labels else g
                raise DataError(
                    f"level '{lvl}': group {label!r} has no {'observations' if child == OBS else child + ' groups'}"
                    " (ids must be dense 0..G-1 with no gaps)"
                )
            sizes[lvl] = n
            if child != OBS and child in self.labels and len(self.labels[child]) != idx.numel():
                raise DataError(f"level '{child}': {len(self.labels[child])} labels for {idx.numel()} groups")
        for lvl, labs in self.labels.items():
            try:
                unique = len(set(labs)) == len(labs)
            except TypeError:
                raise DataError(f"level '{lvl}': labels must be hashable (numbers or strings)") from None
            if not unique:
                raise DataError(f"level '{lvl}': labels are not unique")
        return sizes

    # ------------------------------------------------------------------ accessors
    @property
    def n_obs(self) -> int:
        """Number of observations (rows)."""
        return int(self.group.shape[0])

    @property
    def batch_size(self) -> int | None:
        """B when the response holds B datasets ``[B, N]``; None for a single dataset."""
        return None if self.y is None or self.y.dim() == 1 else int(self.y.shape[0])

    def size(self, level: str) -> int:
        """Number of groups at ``level`` (``"obs"``: number of observations)."""
        if level == OBS:
            return self.n_obs
        if level not in self.levels:
            raise DataError(f"unknown level '{level}'; levels are {list(self.levels)}")
        return self._sizes[level]

    @property
    def sizes(self) -> dict[str, int]:
        """Number of groups per level, outermost first."""
        return {lvl: self.size(lvl) for lvl in self.levels}

    @property
    def x(self) -> dict[str, torch.Tensor]:
        """All covariates by name (each ``[G_level]`` or ``[N]``)."""
        return {name: self.covariates[lvl][name] for name, lvl in self.covariate_level.items()}

    def index(self, level: str, at: str = OBS) -> torch.Tensor:
        """Index ``[size(at)]`` of the ``level`` group that each unit of ``at`` belongs to.

        ``at`` defaults to the observations; gather a level's latent for each row with
        ``theta[..., data.index("school")]`` (the ``...`` keeps the model batch-safe).
        """
        key = (level, at)
        if key not in self._index_cache:
            order = list(self.levels) + [OBS]
            if level not in self.levels or at not in order or order.index(at) <= order.index(level):
                raise DataError(f"index: level '{level}' is not above '{at}' (levels {list(self.levels)})")
            if at == OBS:
                idx, cur = self.group, len(self.levels) - 1
            else:
                idx, cur = self.parents[at], order.index(at) - 1
            while cur > order.index(level):
                idx, cur = self.parents[self.levels[cur]][idx], cur - 1
            self._index_cache[key] = idx
        return self._index_cache[key]

    def parent_index(self, level: str) -> torch.Tensor:
        """Index ``[size(level)]`` of each group's parent in the level above."""
        i = self.levels.index(level)
        if i == 0:
            raise DataError(f"level '{level}' is the outermost level and has no parent")
        return self.index(self.levels[i - 1], at=level)

    def counts(self, level: str, at: str = OBS) -> torch.Tensor:
        """Number of units of ``at`` in each group of ``level``: ``[size(level)]``."""
        return torch.bincount(self.index(level, at), minlength=self.size(level))

    def with_response(self, y: torch.Tensor | None) -> HierarchicalData:
        """The same structure and covariates with another response (``[N]`` or ``[B, N]``).

        Raises:
            DataError: ``y`` is not a tensor of shape ``[N]`` or ``[B, N]``.
        """
        if y is not None and not isinstance(y, torch.Tensor):
            raise DataError(f"response '{self.response}': with_response takes a tensor, got {type(y).__name__}")
        new = object.__new__(HierarchicalData)
        new.__dict__.update(self.__dict__)
        new.y = None if y is None else self._check_response(y)
        return new

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HierarchicalData:
        """A copy on ``device`` with floating tensors cast to ``dtype``."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        new = self.with_response(mv(self.y))
        new.group = mv(self.group)
        new.parents = {k: mv(v) for k, v in self.parents.items()}
        new.covariates = {lvl: {k: mv(v) for k, v in cols.items()} for lvl, cols in self.covariates.items()}
        new._index_cache = {}
        return new

    def skeleton(self) -> HierarchicalData:
        """The same groups with one observation each (the first row of every innermost group).

        Drawing from the guide runs the model for its conditional priors only; on the skeleton its
        likelihood line costs one row per group instead of N (see :mod:`amortize.posterior`).
        """
        G = self.size(self.levels[-1])
        first = torch.full((G,), self.n_obs, dtype=torch.long, device=self.group.device)
        first = first.scatter_reduce(0, self.group, torch.arange(self.n_obs, device=self.group.device), "amin")
        new = self.with_response(None)
        new.group = torch.arange(G, device=self.group.device)
        new.y = None if self.y is None else self.y[..., first]
        new.covariates = {
            lvl: ({k: v[first] for k, v in cols.items()} if lvl == OBS else dict(cols))
            for lvl, cols in self.covariates.items()
        }
        new._index_cache = {}
        return new

    def structure_signature(self) -> dict[str, Any]:
        """What a model needs of a dataset: levels and covariate names per level."""
        return {
            "levels": list(self.levels),
            "covariates": {lvl: sorted(cols) for lvl, cols in sorted(self.covariates.items())},
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lvl}={n}" for lvl, n in self.sizes.items())
        batch = f", batch={self.batch_size}" if self.batch_size else ""
        cov = ", ".join(f"{k}@{v}" for k, v in self.covariate_level.items())
        return f"HierarchicalData({sizes}, obs={self.n_obs}{batch}{', covariates: ' + cov if cov else ''})"

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_frame(
        cls,
        frame: Any,
        levels: Sequence[str],
        response: str | None = None,
        covariates: Mapping[str, Sequence[str]] | None = None,
        nested_ids: bool = False,
    ) -> HierarchicalData:
        """Build from a long-format table (pandas DataFrame or dict of columns).

        Args:
            frame: one row per observation.
            levels: id columns, outermost first; ids may be any labels (names, codes).
            response: response column; None for a structure without response.
            covariates: ``{level: [columns]}`` with ``"obs"`` for row-level covariates. A level
                covariate must be constant within each group of that level.
            nested_ids: if True, ids are unique only within their parent (school 1 of district A
                differs from school 1 of district B); by default ids are global.

        Raises:
            DataError: naming the column, level or group at fault.
        """
        columns = _columns(frame)
        levels = _names(levels, "levels")
        if not levels:
            raise DataError("levels: at least one grouping level (id column) is required")
        if response is not None and not isinstance(response, str):
            raise DataError(f"response: expected a column name, got {response!r}")
        if not isinstance(covariates or {}, Mapping):
            raise DataError(f"covariates: expected {{level: [columns]}}, got {covariates!r}")
        covariates = {lvl: _names(cols, f"covariates of level '{lvl}'") for lvl, cols in (covariates or {}).items()}
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
                if _is_missing(v):
                    raise DataError(f"column '{lvl}': missing id in row {r}")
                first = kinds.setdefault(v, (_id_kind(v), v, r))
                if first[0] != _id_kind(v):  # 1, 1.0 and True are equal (one dict key) yet different labels
                    raise DataError(
                        f"column '{lvl}': ids {first[1]!r} ({first[0]}, row {first[2]}) and {v!r} ({_id_kind(v)},"
                        f" row {r}) would be merged into one group; give the column one type of id"
                    )
            key = (
                [(*p, v) if isinstance(p, tuple) else (p, v) for p, v in zip(prev, ids)]
                if (nested_ids and prev)
                else ids
            )
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
        return cls(
            levels,
            parents,
            codes[levels[-1]],
            y=y,
            covariates=cov,
            labels=labels,
            response=response or "y",
        )

    @classmethod
    def from_csv(cls, path: str, levels: Sequence[str], response: str | None = None, **kwargs: Any) -> HierarchicalData:
        """Read a long-format CSV file (header row, one row per observation); see :meth:`from_frame`."""
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
        try:
            return cls.from_frame(cols, levels, response=response, **kwargs)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None


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
    t = _as_float(columns[col], f"column '{col}'", torch.float64)
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
    seen: dict[Any, None] = {}
    for k in keys:
        seen.setdefault(k, None)
    uniq = list(seen)
    try:
        return sorted(uniq)
    except TypeError:
        return uniq
