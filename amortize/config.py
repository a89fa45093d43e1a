"""Experiment configs: YAML files validated against a dataclass schema with OmegaConf.

A config names the model (``package.module:function`` or ``path/to/file.py:function``), the
training structures (ranges of groups and observations, or the fixed structure of a named
dataset), the network, the :class:`~amortize.train.TrainConfig` and the validation settings.
Every error is a :class:`~amortize.errors.ConfigError` that names the key and the file.

Example:
    >>> cfg = load_config("experiments/gaussian_2level.yaml", ["train.steps=500"])  # doctest: +SKIP
    >>> model = resolve_model(cfg.model, config_dir(cfg))  # doctest: +SKIP  (amortize.modelspec)
    >>> sampler = build_sampler(cfg)  # doctest: +SKIP  (amortize.experiment)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from .checkpoint import write_text
from .errors import ConfigError
from .limits import Limit, check_limits
from .modelspec import absolute_model_spec, absolute_path
from .train import TrainConfig

__all__ = [
    "Config",
    "NetworkConfig",
    "StructureConfig",
    "DatasetConfig",
    "NUTSConfig",
    "ValidateConfig",
    "load_config",
    "config_source",
    "config_dir",
    "config_to_yaml",
    "save_config",
]

SEED = Limit(0, 2**32 - 1)  # numpy's seeds (pyro.set_rng_seed seeds numpy too)
CONFIG_LIMITS = {  # every numeric option of Config; train.* is TrainConfig's (TRAIN_LIMITS), checked when it is built
    "seed": SEED,
    "network.hidden": Limit(1),
    "validate.num_samples": Limit(1),
    "validate.datasets": Limit(1),
    "validate.seed": replace(SEED, optional=True),
    "validate.nuts.num_warmup": Limit(0),
    "validate.nuts.num_samples": Limit(1),
    "validate.nuts.num_chains": Limit(1),
    "validate.nuts.target_accept": Limit(0, 1, open_low=True, open_high=True),
    "validate.nuts.max_rhat": Limit(1),
    "validate.nuts.min_ess": Limit(0),
}
COVARIATE_LIMITS = {"scale": Limit(0), "p": Limit(0, 1)}  # loc, low, high: any finite number
MAX_ROWS = 10**8  # a training structure larger than this is a typo, not a plan: refused before allocating it
COVARIATE_PARAMS = {
    "normal": {"loc", "scale"},
    "uniform": {"low", "high"},
    "bernoulli": {"p"},
    "integer": {"low", "high"},
}


@dataclass
class NetworkConfig:
    """Network size, and whether group data terms couple to the globals (see :class:`~amortize.Amortizer`)."""

    hidden: int = 64
    global_coupling: bool = True


@dataclass
class StructureConfig:
    """Training structures: ranges for a :class:`StructureSampler`, or ``data`` naming a dataset to reuse."""

    levels: list[str] = field(default_factory=lambda: ["group"])
    groups: dict[str, list[int]] = field(default_factory=lambda: {"group": [10, 50]})
    obs: list[int] = field(default_factory=lambda: [5, 30])
    covariates: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    data: str | None = None
    vary_sizes: bool = False  # each dataset draws its own sub-range of group sizes (StructureSampler)


@dataclass
class DatasetConfig:
    """A long-format CSV: id columns per level (outermost first), response and covariates per level."""

    path: str = MISSING
    levels: list[str] = MISSING
    response: str = "y"
    covariates: dict[str, list[str]] = field(default_factory=dict)
    nested_ids: bool = False


@dataclass
class NUTSConfig:
    """Settings of the NUTS reference (see :func:`amortize.validate.run_nuts`)."""

    num_warmup: int = 500
    num_samples: int = 1000
    num_chains: int = 2
    reparam: str = "auto"
    target_accept: float = 0.9
    max_rhat: float = 1.01  # the reference counts only if a scalar's R-hat is below this (a site of many
    min_ess: float = 100.0  # elements: validate.nuts.rhat_threshold), every bulk ESS >= this, no divergence


@dataclass
class ValidateConfig:
    """Validation: amortized draws per dataset, held-out simulated datasets, NUTS settings."""

    num_samples: int = 1000
    datasets: int = 10
    seed: int | None = None  # held-out datasets' seed; None: the run's seed + 100003
    nuts: NUTSConfig = field(default_factory=NUTSConfig)


@dataclass
class Config:
    """One experiment (see ``experiments/*.yaml``); every field but ``model`` has a default."""

    model: str = MISSING
    name: str = "experiment"
    seed: int = 0
    device: str = "cpu"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    data: dict[str, DatasetConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)


# ---------------------------------------------------------------------------------------------- loading
def _translate(e: OmegaConfBaseException, where: str) -> ConfigError:
    """One readable line for an OmegaConf error: the file (or override), the key, the problem."""
    key = getattr(e, "full_key", None) or "?"
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0].strip()
    if isinstance(e, ConfigKeyError):
        hint = msg[msg.index("Did you mean") :] if "Did you mean" in msg else ""
        return ConfigError(f"{where}: unknown key '{key}'{' (' + hint + ')' if hint else ''}")
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"{where}: key '{key}' is required but not set")
    if isinstance(e, ValidationError):
        return ConfigError(f"{where}: key '{key}': {msg}")
    return ConfigError(f"{where}: key '{key}': {type(e).__name__}: {msg}")


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except (OmegaConfBaseException, TypeError) as e:  # TypeError: "Cannot merge incompatible container types"
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            raise _translate(e, where) from None
        theirs = OmegaConf.to_container(other, resolve=False) if isinstance(other, DictConfig) else other
        key = _failing_key(base, theirs)
        if isinstance(e, TypeError):
            raise ConfigError(f"{where}: key '{key}': a list where a mapping is expected, or the reverse") from None
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0].strip()
        raise ConfigError(f"{where}: key '{key}': {msg}") from None


def _failing_key(base: DictConfig, other: Any, path: tuple[str, ...] = ()) -> str:
    """The deepest key of ``other`` whose value alone fails to merge into ``base``."""
    node = other
    for k in path:
        node = node[k]
    for k in node if isinstance(node, dict) else []:
        trial: Any = node[k]
        for p in reversed((*path, k)):
            trial = {p: trial}
        try:
            OmegaConf.merge(base, trial)
        except (OmegaConfBaseException, TypeError):
            return _failing_key(base, other, (*path, k))
    return ".".join(map(str, path)) or "?"


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate it against :class:`Config`.

    Relative model and data paths are made absolute (tried against the config's folder, then the
    working directory), so a snapshot of the result works from anywhere.

    Args:
        path: the YAML file.
        overrides: OmegaConf dotlist, e.g. ``["train.steps=500", "network.hidden=32"]``.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: missing file, invalid YAML, unknown key, wrong type, missing ``model``,
            bad override; the message names the key and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OmegaConfBaseException as e:
        raise _translate(e, str(path)) from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys (model: ..., train: ...) at the top level")
    schema = OmegaConf.structured(Config)
    if isinstance(raw.get("structure"), DictConfig) and "groups" in raw.structure:
        schema.structure.groups = {}  # a file's groups replace the default ranges instead of adding to them
    merged = _merge(schema, raw, str(path))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=500")
        try:
            dot = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"override {item!r}: {' '.join(str(e).split())}") from None
        merged = _merge(merged, dot, f"{path}: override {item!r}")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _translate(e, str(path)) from None
    except ConfigError as e:  # TrainConfig.__post_init__: "objective: ..." / "steps: ..."
        raise ConfigError(f"{path}: train.{e}") from None
    assert isinstance(cfg, Config)
    base = path.resolve().parent
    cfg.model = absolute_model_spec(cfg.model, base)
    cfg.data = {k: replace(v, path=absolute_path(v.path, base)) for k, v in cfg.data.items()}
    _check(cfg, str(path))
    cfg._source = str(path)  # type: ignore[attr-defined]
    cfg._base_dir = str(base)  # type: ignore[attr-defined]
    return cfg


def config_source(cfg: Config) -> str:
    """The file a config was read from (for messages)."""
    return getattr(cfg, "_source", "<config>")


def config_dir(cfg: Config) -> str:
    """The folder relative model and data paths are resolved against."""
    return getattr(cfg, "_base_dir", os.getcwd())


def _check(cfg: Config, src: str) -> None:
    """Checks beyond types: names that refer to other keys, ranges, positive counts."""
    if ":" not in cfg.model:
        raise ConfigError(f"{src}: model: {cfg.model!r} is not 'package.module:function' or 'path/to/file.py:function'")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"{src}: name: {cfg.name!r} cannot be used as a folder name")
    s = cfg.structure
    if s.data is not None and s.data not in cfg.data:
        raise ConfigError(f"{src}: structure.data: {s.data!r} is not an entry of data (entries: {sorted(cfg.data)})")
    for name, d in cfg.data.items():
        if not d.levels:
            raise ConfigError(f"{src}: data.{name}.levels: at least one level (id column) is required")
    check_limits(cfg, CONFIG_LIMITS, prefix=f"{src}: ")
    v = cfg.validate
    if v.nuts.reparam not in ("auto", "none", "noncentered"):
        raise ConfigError(f"{src}: validate.nuts.reparam: {v.nuts.reparam!r} is not one of auto, none, noncentered")


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory's ``config.yaml`` holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically as YAML."""
    write_text(path, config_to_yaml(cfg))
