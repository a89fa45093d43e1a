"""Hierarchical datasets in long format: one row per observation, one id per level.

A :class:`HierarchicalData` holds the levels (outermost first), for every level below the
first a dense index of each group's parent, the innermost group of every observation, the
response, and covariates that live at a level or at the observations. The response may
carry a leading batch dimension ``[B, N]``: B datasets that share one structure.

Example: ``HierarchicalData.from_frame({"school": [0, 0, 1], "y": [1.0, 2.0, 0.5]}, levels=["school"],
response="y")`` has ``size("school") == 2`` and ``n_obs == 3``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .errors import DataError
from .layout import chain_of, chain_sizes, check_factors, covering_rows, walk_index
from .tables import encode_factors, encode_frame, read_csv_columns
from .values import OBS, CovariatesByName, as_float, as_index, magnitude_limit, names_list

__all__ = ["HierarchicalData", "OBS", "magnitude_limit"]


class HierarchicalData:
    """A nested (ragged) or crossed dataset: grouping factors, each a chain of nested levels
    (outermost first), observations as rows.

    Args:
        levels: level names, outermost first, e.g. ``["district", "school"]``; with several
            factors, every factor's levels, factor by factor.
        parents: for every level but the first of its factor, an index ``[G_level]`` of each
            group's parent group in the level above.
        group: ``[N]`` index of each observation's group at the innermost level; with several
            factors ``{innermost level: [N]}``, one index per factor.
        y: response, ``[N]`` or ``[B, N]`` (B datasets sharing this structure), or None.
        covariates: ``{level: {name: values}}``; ``level`` is a level name (values ``[G_level]``)
            or ``"obs"`` (values ``[N]``). Covariate names are unique across levels.
        labels: optional original group ids per level (used for coordinates in exports).
        response: name of the response column (for messages and exports).
        factors: the chains of nested levels, e.g. ``[["person"], ["test", "item"]]`` for persons
            crossed with items nested in tests; None: one chain, ``levels``.

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
        factors: Sequence[Sequence[str]] | None = None,
    ) -> None:
        dtype = dtype or torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DataError(f"dtype: expected a floating-point torch dtype, got {dtype!r}")
        self.levels = tuple(names_list(levels, "levels"))
        self.response = response
        self._check_levels()
        self.factors = check_factors(self.levels, factors)
        inner = [chain[-1] for chain in self.factors]
        if not isinstance(group, Mapping):
            if len(inner) > 1:
                raise DataError(f"group: several factors need one row index per factor, {{level: [N]}} for {inner}")
            group = {inner[0]: group}
        if sorted(group) != sorted(inner):
            raise DataError(f"group: expected a row index for each factor's innermost level {inner}, got {list(group)}")
        self.row_index = {lvl: as_index(group[lvl], f"observations' '{lvl}' index") for lvl in inner}
        if len({int(t.numel()) for t in self.row_index.values()}) > 1:
            sizes = {k: len(v) for k, v in self.row_index.items()}
            raise DataError(f"group: the factors' row indices differ in length ({sizes})")
        self.group = self.row_index[inner[0]]
        if not isinstance(parents, Mapping):
            raise DataError(f"parents: expected {{level: parent index}}, got {type(parents).__name__}")
        below = [lvl for chain in self.factors for lvl in chain[1:]]
        stray = [lvl for lvl in parents if lvl not in below]
        if stray:
            raise DataError(f"parents given for {stray}, which are not inner levels of {list(self.levels)}")
        self.parents = {lvl: as_index(parents[lvl], f"level '{lvl}': parent index") for lvl in below if lvl in parents}
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
        self._index_cache: dict[tuple, Any] = {}
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
        for chain in self.factors:
            sizes.update(chain_sizes(chain, self.parents, self.row_index[chain[-1]], self.labels))
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
    def crossed(self) -> bool:
        """Whether the rows belong to several grouping factors (persons x items), not one chain."""
        return len(self.factors) > 1

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
        return CovariatesByName(self)

    def index(self, level: str, at: str = OBS) -> torch.Tensor:
        """Index ``[size(at)]`` of the ``level`` group that each unit of ``at`` belongs to.

        ``at`` defaults to the observations; gather a level's latent for each row with
        ``theta[..., data.index("school")]`` (the ``...`` keeps the model batch-safe).
        """
        if level == self.row_level and at in (OBS, level):
            return self.group  # the rows are that level's groups: [N] = arange(N)
        chain = chain_of(self.factors, level)
        return self.derived(
            ("index", level, at), lambda: walk_index(chain, self.parents, self.row_index[chain[-1]], level, at)
        )

    def derived(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()``, a function of the structure alone, computed once per structure and device (shared)."""
        if key not in self._index_cache:
            self._index_cache[key] = build()
        return self._index_cache[key]

    def parent_index(self, level: str) -> torch.Tensor:
        """Index ``[size(level)]`` of each group's parent in the level above."""
        chain = chain_of(self.factors, level)
        i = chain.index(level)
        if i == 0:
            raise DataError(f"level '{level}' is the outermost level of its factor and has no parent")
        return self.index(chain[i - 1], at=level)

    def counts(self, level: str, at: str = OBS) -> torch.Tensor:
        """Number of units of ``at`` in each group of ``level``: ``[size(level)]``."""
        return torch.bincount(self.index(level, at), minlength=self.size(level))

    def factor(self, k: int) -> HierarchicalData:
        """Factor ``k`` alone: a nested dataset of its chain of levels, on the same rows (the response and
        the row covariates), with the covariates of its levels. A nested dataset is its own factor 0."""
        if not self.crossed:
            return self
        chain = self.factors[k]
        cov = {lvl: cols for lvl, cols in self.covariates.items() if lvl in chain or lvl == OBS}
        new = self.with_response(self.y)
        new.levels, new.factors, new.covariates = chain, (chain,), cov
        new.covariate_level = {name: lvl for name, lvl in self.covariate_level.items() if lvl in cov}
        new.parents = {lvl: self.parents[lvl] for lvl in chain[1:]}
        new.row_index = {chain[-1]: self.row_index[chain[-1]]}
        new.group, new._sizes, new._index_cache = new.row_index[chain[-1]], {c: self._sizes[c] for c in chain}, {}
        return new

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
        new.row_index = {k: mv(v) for k, v in self.row_index.items()}
        new.group = new.row_index[self.factors[0][-1]]
        new.parents = {k: mv(v) for k, v in self.parents.items()}
        new.covariates = {lvl: {k: mv(v) for k, v in cols.items()} for lvl, cols in self.covariates.items()}
        new._index_cache = self._index_cache if new.group is self.group else {}  # same device: share the cache
        return new

    def skeleton(self) -> HierarchicalData:
        """The same groups with one observation each (the first row of every innermost group).

        Drawing from the guide runs the model for its conditional priors only; on the skeleton its
        likelihood line costs one row per group instead of N (see :mod:`amortize.posterior`). Crossed:
        the fewest rows (greedily) that keep a row of every innermost group of every factor.
        """
        if self.crossed:
            rows = covering_rows(self.row_index, self.n_obs)
            new = self.with_response(None)
            new.row_index = {k: v[rows] for k, v in self.row_index.items()}
            new.group = new.row_index[self.factors[0][-1]]
            new.y = None if self.y is None else self.y[..., rows]
            new.covariates = {
                lvl: ({k: v[rows] for k, v in cols.items()} if lvl == OBS else dict(cols))
                for lvl, cols in self.covariates.items()
            }
            new._index_cache = {}
            return new
        G = self.size(self.levels[-1])
        first = torch.full((G,), self.n_obs, dtype=torch.long, device=self.group.device)
        first = first.scatter_reduce(0, self.group, torch.arange(self.n_obs, device=self.group.device), "amin")
        new = self.with_response(None)
        new.group = torch.arange(G, device=self.group.device)
        new.row_index = {self.levels[-1]: new.group}
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
        if self.crossed:
            raise DataError(f"level '{name}': latents per row are not supported in a crossed design yet")
        new = self.with_response(self.y)
        new.levels = (*self.levels, name)
        new.factors = (new.levels,)
        new.parents = {**self.parents, name: self.group}
        new.group = torch.arange(self.n_obs, device=self.group.device)
        new.row_index = {name: new.group}
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
        new.factors = (new.levels,)
        new.group = self.parents[self.row_level]
        new.row_index = {new.levels[-1]: new.group}
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
        """What a model needs of a dataset: levels (and factors, when crossed) and covariate names per level."""
        out: dict[str, Any] = {"levels": list(self.levels)}
        if self.crossed:
            out["factors"] = [list(chain) for chain in self.factors]
        out["covariates"] = {lvl: sorted(cols) for lvl, cols in sorted(self.covariates.items())}
        return out

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
        levels: Sequence[str] | None = None,
        response: str | None = None,
        covariates: Mapping[str, Sequence[str]] | None = None,
        nested_ids: bool = False,
        factors: Mapping[str, Sequence[str]] | None = None,
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
            factors: crossed grouping factors instead of ``levels``, ``{name: [id columns]}`` each
                a chain outermost first: ``{"person": ["person"], "item": ["test", "item"]}``.

        Raises:
            DataError: naming the column, level or group at fault.
        """
        if factors is not None:
            if levels is not None:
                raise DataError("give levels (one chain of nested levels) or factors (crossed chains), not both")
            return cls(**encode_factors(frame, factors, response, covariates, nested_ids))
        if levels is None:
            raise DataError("levels: the id columns, outermost first (or factors= for a crossed design)")
        return cls(**encode_frame(frame, levels, response, covariates, nested_ids))

    @classmethod
    def from_csv(cls, path: str, levels: Sequence[str], response: str | None = None, **kwargs: Any) -> HierarchicalData:
        """Read a long-format CSV file (header row, one row per observation); see :meth:`from_frame`."""
        cols = read_csv_columns(path)
        try:
            return cls.from_frame(cols, levels, response=response, **kwargs)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
