"""What a config builds from its ``structure`` and ``data`` entries: the training structure sampler and
the datasets it reads.

Example:
    >>> cfg = load_config("experiments/gaussian_2level.yaml")  # doctest: +SKIP
    >>> sampler = build_sampler(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os

from .config import COVARIATE_LIMITS, COVARIATE_PARAMS, MAX_ROWS, Config, DatasetConfig, config_source
from .data import OBS, HierarchicalData
from .errors import ConfigError, DataError
from .limits import Limit, check_limits
from .simulate import StructureSampler

__all__ = ["build_sampler", "dataset_spec", "read_dataset", "load_dataset"]


def build_sampler(cfg: Config) -> StructureSampler:
    """The training :class:`StructureSampler`: ranges from ``structure``, or the fixed structure of
    the dataset named by ``structure.data``.

    Raises:
        ConfigError: inconsistent levels and ranges, unknown covariate distribution, missing data file.
    """
    src, s = config_source(cfg), cfg.structure
    if s.data is not None:
        return StructureSampler.fixed(load_dataset(cfg, s.data))
    if not s.levels:
        raise ConfigError(f"{src}: structure.levels: at least one level is required")
    if len(set(s.levels)) != len(s.levels) or OBS in s.levels or not all(s.levels):
        raise ConfigError(f"{src}: structure.levels: need distinct non-empty names other than '{OBS}', got {s.levels}")
    for lvl in s.levels:
        if lvl not in s.groups:
            raise ConfigError(f"{src}: structure.groups: no [lo, hi] range for level '{lvl}'")
    for lvl in s.groups:
        if lvl not in s.levels:
            raise ConfigError(f"{src}: structure.groups.{lvl}: not a level (structure.levels: {s.levels})")
    for key, rng in [(f"groups.{k}", v) for k, v in s.groups.items()] + [("obs", s.obs)]:
        if len(rng) != 2 or not 1 <= rng[0] <= rng[1]:
            raise ConfigError(f"{src}: structure.{key}: need [lo, hi] with 1 <= lo <= hi, got {list(rng)}")
    rows = math.prod(s.groups[lvl][1] for lvl in s.levels) * s.obs[1]
    if rows > MAX_ROWS:
        raise ConfigError(
            f"{src}: structure: the largest dataset these ranges allow has {rows:.3g} rows (limit {MAX_ROWS:.0e});"
            " lower the upper bounds of structure.groups or structure.obs"
        )
    for lvl, specs in s.covariates.items():
        if lvl != OBS and lvl not in s.levels:
            raise ConfigError(f"{src}: structure.covariates.{lvl}: not a level ({s.levels} or '{OBS}')")
        for name, spec in specs.items():
            key = f"structure.covariates.{lvl}.{name}"
            kind = spec.get("dist", "normal")
            if kind not in COVARIATE_PARAMS:
                raise ConfigError(f"{src}: {key}.dist: unknown {kind!r} (one of {', '.join(COVARIATE_PARAMS)})")
            extra = sorted(set(spec) - COVARIATE_PARAMS[kind] - {"dist"})
            if extra:
                raise ConfigError(f"{src}: {key}: unknown parameter(s) {extra} for {kind!r}")
            check_limits(
                spec,
                {k: COVARIATE_LIMITS.get(k, Limit()) for k in COVARIATE_PARAMS[kind] & set(spec)},
                f"{src}: {key}.",
            )
            if kind == "integer" and any(float(spec.get(k, 0)) != int(spec.get(k, 0)) for k in ("low", "high")):
                raise ConfigError(f"{src}: {key}: low and high of 'integer' must be whole numbers, got {dict(spec)}")
            if kind in ("uniform", "integer") and spec.get("low", 0.0) > spec.get("high", 1.0):
                raise ConfigError(f"{src}: {key}: low {spec.get('low', 0.0)} is above high {spec.get('high', 1.0)}")
    try:
        return StructureSampler(
            s.levels,
            groups={k: (v[0], v[1]) for k, v in s.groups.items()},
            obs=(s.obs[0], s.obs[1]),
            covariates=s.covariates,
            vary_sizes=s.vary_sizes,
        )
    except ConfigError as e:
        raise ConfigError(f"{src}: structure.{e}") from None


def dataset_spec(cfg: Config, name: str | None = None) -> DatasetConfig:
    """How to read a CSV for this experiment: the ``data`` entry ``name`` (default ``structure.data``),
    or, without one, id columns named after ``structure.levels``, response ``y`` and the covariates
    of ``structure.covariates`` (``path`` is left unset)."""
    name = name if name is not None else cfg.structure.data
    if name is not None:
        if name not in cfg.data:
            raise ConfigError(f"{config_source(cfg)}: data: no entry '{name}' (entries: {sorted(cfg.data)})")
        return cfg.data[name]
    s = cfg.structure
    return DatasetConfig(
        path="",
        levels=list(s.levels),
        covariates={lvl: sorted(specs) for lvl, specs in s.covariates.items() if specs},
    )


def read_dataset(spec: DatasetConfig, path: str | os.PathLike | None = None, key: str = "data") -> HierarchicalData:
    """Read the CSV at ``path`` (default ``spec.path``) as described by ``spec``.

    Raises:
        ConfigError: the file does not exist (names ``key`` and the file).
        DataError: a column is missing or malformed (names the column).
    """
    p = os.fspath(path) if path is not None else spec.path
    if not p or not os.path.isfile(p):
        raise ConfigError(f"{key}: no such data file '{p}'")
    return HierarchicalData.from_csv(
        p, list(spec.levels), response=spec.response, covariates=spec.covariates, nested_ids=spec.nested_ids
    )


def load_dataset(cfg: Config, name: str) -> HierarchicalData:
    """Read the dataset ``cfg.data[name]``.

    Raises:
        ConfigError: no such entry, or its file is missing (names ``data.<name>.path`` and the config file).
        DataError: a column is missing or malformed (names the column and the CSV file).
    """
    spec = dataset_spec(cfg, name)
    try:
        return read_dataset(spec, key=f"{config_source(cfg)}: data.{name}.path")
    except DataError as e:
        raise DataError(f"{config_source(cfg)}: data.{name}: {e}") from None
