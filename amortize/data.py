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

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .errors import DataError
from .tables import encode_frame, read_csv_columns
from .values import OBS, as_float, as_index, magnitude_limit, names_list

__all__ = ["HierarchicalData", "OBS", "magnitude_limit"]


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
        self.levels = tuple(names_list(levels, "levels"))
        self.response = response
        self._check_levels()
        self.group = as_index(group, "observations' innermost group index")
        if not isinstance(parents, Mapping):
            raise DataError(f"parents: expected {{level: parent index}}, got {type(parents).__name__}")
        stray = [lvl for lvl in parents if lvl not in self.levels[1:]]
        if stray:
            raise DataError(f"parents given for {stray}, which are not inner levels of {list(self.levels)}")
        self.parents = {
            lvl: as_index(parents[lvl], f"level '{lvl}': parent index") for lvl in self.levels[1:] if lvl in parents
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
                t = as_float(values, f"covariate '{name}' (level '{lvl}')", dtype)
                want = self.n_obs if lvl == OBS else self.size(lvl)
                if t.dim() != 1 or t.shape[0] != want:
                    raise DataError(
                        f"covariate '{name}' (level '{lvl}'): expected {want} values, got shape {tuple(t.shape)}"
                    )
                self.covariates[lvl][name] = t
                self.covariate_level[name] = lvl
        self.y = None
        if y is not None:
            self.y = self._check_response(as_float(y, f"response '{response}'", dtype))
        self._index_cache: dict[tuple[str, str], torch.Tensor] = {}
        self.row_level: str | None = None  # an innermost level whose groups are the rows (see rows_as_level)

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
    def x(self) -> Mapping[str, torch.Tensor]:
        """All covariates by name (each ``[G_level]`` or ``[N]``), looked up in their level when read."""
        return _ByName(self)

    def index(self, level: str, at: str = OBS) -> torch.Tensor:
        """Index ``[size(at)]`` of the ``level`` group that each unit of ``at`` belongs to.

        ``at`` defaults to the observations; gather a level's latent for each row with
        ``theta[..., data.index("school")]`` (the ``...`` keeps the model batch-safe).
        """
        key = (level, at)
        if level == self.row_level and at in (OBS, level):
            return self.group  # the rows are that level's groups: [N] = arange(N)
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

    def rows_as_level(self, name: str) -> HierarchicalData:
        """The same dataset with one more, innermost, level ``name`` whose groups are the rows (one row
        each; its parents are the rows' innermost groups): the level of a model's latent sites that live
        in the observation plate (one effect per row). ``name`` is the plate's name and may be ``"obs"``.

        Raises:
            DataError: ``name`` is already a level of the data.
        """
        if self.row_level == name:
            return self
        if name in self.levels:
            raise DataError(f"level '{name}': the rows cannot be a level of that name, the data has one already")
        new = self.with_response(self.y)
        new.levels = (*self.levels, name)
        new.parents = {**self.parents, name: self.group}
        new.group = torch.arange(self.n_obs, device=self.group.device)
        new._sizes = {**self._sizes, name: self.n_obs}
        new.row_level = name
        new._index_cache = {}
        return new

    def as_levels(self, levels: Sequence[str]) -> HierarchicalData:
        """This dataset seen through a model's ``levels``: with the implicit row level (see
        :meth:`rows_as_level`) where ``levels`` are the data's own plus one; else the dataset itself."""
        levels = tuple(levels)
        if self.row_level is None and len(levels) == len(self.levels) + 1 and levels[:-1] == self.levels:
            return self.rows_as_level(levels[-1])
        return self

    def declared(self) -> HierarchicalData:
        """The dataset without its implicit row level (the inverse of :meth:`rows_as_level`)."""
        if self.row_level is None:
            return self
        new = self.with_response(self.y)
        new.levels = self.levels[:-1]
        new.group = self.parents[self.row_level]
        new.parents = {k: v for k, v in self.parents.items() if k != self.row_level}
        new._sizes = {k: v for k, v in self._sizes.items() if k != self.row_level}
        new.row_level = None
        new._index_cache = {}
        return new

    @property
    def declared_levels(self) -> tuple[str, ...]:
        """The levels the data declares (its id columns): :attr:`levels` without an implicit row level."""
        return self.levels[:-1] if self.row_level is not None else self.levels

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
        return cls(**encode_frame(frame, levels, response, covariates, nested_ids))

    @classmethod
    def from_csv(cls, path: str, levels: Sequence[str], response: str | None = None, **kwargs: Any) -> HierarchicalData:
        """Read a long-format CSV file (header row, one row per observation); see :meth:`from_frame`."""
        cols = read_csv_columns(path)
        try:
            return cls.from_frame(cols, levels, response=response, **kwargs)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None


class _ByName(Mapping):
    """A dataset's covariates by name, read from ``data.covariates[level]`` on each lookup (so a
    trace records which ones a model reads, see :func:`amortize.structure.trace_structure`)."""

    def __init__(self, data: HierarchicalData) -> None:
        self._data = data

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._data.covariates[self._data.covariate_level[name]][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data.covariate_level)

    def __len__(self) -> int:
        return len(self._data.covariate_level)
