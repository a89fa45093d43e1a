"""Experiment configs: YAML files validated against a dataclass schema with OmegaConf.

A config names the model (``package.module:function`` or ``path/to/file.py:function``), the
training structures (ranges of groups and observations, or the fixed structure of a named
dataset), the network, the :class:`~amortize.train.TrainConfig` and the validation settings.
Every error is a :class:`~amortize.errors.ConfigError` that names the key and the file.

Example:
    >>> cfg = load_config("experiments/gaussian_2level.yaml", ["train.steps=500"])  # doctest: +SKIP
    >>> model = resolve_model(cfg.model, config_dir(cfg))  # doctest: +SKIP
    >>> sampler = build_sampler(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from .checkpoint import atomic_write
from .data import OBS, HierarchicalData
from .errors import ConfigError, DataError
from .limits import Limit, check_limits
from .simulate import StructureSampler
from .train import TrainConfig

__all__ = [
    "Config",
    "NetworkConfig",
    "StructureConfig",
    "DatasetConfig",
    "NUTSConfig",
    "ValidateConfig",
    "load_config",
    "resolve_model",
    "build_sampler",
    "load_dataset",
    "read_dataset",
    "dataset_spec",
    "config_source",
    "config_dir",
    "config_to_yaml",
    "save_config",
    "write_text",
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
COVARIATE_PARAMS = {"normal": {"loc", "scale"}, "uniform": {"low", "high"}, "bernoulli": {"p"}}


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
    cfg.model = _absolute_model_spec(cfg.model, base)
    cfg.data = {k: replace(v, path=_absolute(v.path, base)) for k, v in cfg.data.items()}
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


def _absolute(p: str, base: Path) -> str:
    """``p`` made absolute if it exists relative to ``base`` or the working directory; else unchanged."""
    if not p or os.path.isabs(p):
        return p
    for root in (base, Path.cwd()):
        if (root / p).exists():
            return str((root / p).resolve())
    return p


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _absolute_model_spec(spec: str, base: Path) -> str:
    if ":" not in spec:
        return spec
    target, func = spec.rsplit(":", 1)
    return f"{_absolute(target, base)}:{func}" if _is_file_spec(target) else spec


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


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically, readable as the umask allows (``atomic_write`` alone leaves 0600).

    Raises:
        OSError: the write failed; its ``filename`` is ``path``, which is left as it was.
    """
    data = text.encode()
    try:
        atomic_write(path, lambda fh: fh.write(data))
    except OSError as e:  # disk full, no permission: name the file (the previous one is intact)
        raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------- the model
def resolve_model(spec: str, base_dir: str | os.PathLike | None = None, source: str | None = None) -> Callable:
    """Import the model function named by ``spec``.

    Args:
        spec: ``package.module:function`` or ``path/to/file.py:function``.
        base_dir: folder a relative file path is tried against first (then the working directory).
        source: the config file, named in error messages.

    Returns:
        The model function.

    Raises:
        ConfigError: bad spec, module or file not found, import failure, no such function.
    """
    where = f"{source}: model" if source else "model"
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1]:
        raise ConfigError(f"{where}: {spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    target, func = spec.rsplit(":", 1)
    if _is_file_spec(target):
        found = _absolute(target, Path(base_dir) if base_dir else Path.cwd())
        if not os.path.isfile(found):
            looked = ", ".join(dict.fromkeys(str(Path(r).resolve()) for r in (base_dir or os.getcwd(), os.getcwd())))
            raise ConfigError(f"{where}: model file '{target}' not found (looked in {looked})")
        module, what = _import_file(found, where), f"file '{found}'"
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and (target == e.name or target.startswith(e.name + ".")):
                raise ConfigError(f"{where}: module '{target}' not found (no module named '{e.name}')") from None
            raise ConfigError(f"{where}: importing module '{target}' failed: {e}") from None
        except SystemExit as e:  # sys.exit() at import would end the command silently
            raise ConfigError(f"{where}: module '{target}' raised SystemExit({e.code}) while it was imported") from None
        except Exception as e:  # noqa: BLE001 - any failure inside the user's module is reported in one line
            raise ConfigError(f"{where}: importing module '{target}' failed: {type(e).__name__}: {e}") from None
        what = f"module '{target}'"
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        defined = sorted(
            k for k, v in vars(module).items() if callable(v) and not k.startswith("_") and not isinstance(v, type)
        )
        raise ConfigError(f"{where}: no function '{func}' in {what} (it defines: {', '.join(defined) or 'nothing'})")
    return fn


def _import_file(path: str, where: str) -> ModuleType:
    """Import a Python file as a module (its folder on ``sys.path`` while it runs, for sibling imports)."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    name = f"_amortize_model_{Path(path).stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: '{path}' cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(Path(path).parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:  # sys.exit() at import would end the command silently
        del sys.modules[name]
        raise ConfigError(f"{where}: '{path}' raised SystemExit({e.code}) while it was imported") from None
    except Exception as e:  # noqa: BLE001 - any failure inside the user's file is reported in one line
        del sys.modules[name]
        raise ConfigError(f"{where}: importing '{path}' failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(folder)
    return module


# ---------------------------------------------------------------------------------------------- data and structure
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
            if kind == "uniform" and spec.get("low", 0.0) > spec.get("high", 1.0):
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
