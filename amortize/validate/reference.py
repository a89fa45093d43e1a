"""Loaders of external ground truth (posteriordb draws, Inference Gym moments) shipped in experiments/data/reference.

The folder is ``$AMORTIZE_REFERENCE`` if set, else ``<repo root>/experiments/data/reference`` (the repo
root being the folder above the ``amortize`` package), which ships with the project with the licences
and provenance of every file. Its READMEs describe every model and file; the
numbers there were produced outside this project, so they are ground truth nobody here computed.

Example:
    >>> y, sigma, draws = eight_schools()  # doctest: +SKIP
    >>> float(draws["mu"].mean())  # doctest: +SKIP
    4.41...
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import HierarchicalData
from ..errors import AmortizeError, ConfigError
from .metrics import ReferenceMoments

__all__ = [
    "ReferenceNotFoundError",
    "reference_dir",
    "eight_schools",
    "RadonData",
    "radon_minnesota",
]

ENV_VAR = "AMORTIZE_REFERENCE"


class ReferenceNotFoundError(AmortizeError, FileNotFoundError):
    """A reference folder or file is missing: names the path."""


def reference_dir() -> Path:
    """The reference folder: ``$AMORTIZE_REFERENCE`` or ``<repo root>/experiments/data/reference``.

    Returns:
        The folder's path (it may not exist; the loaders check).
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root / "experiments" / "data" / "reference"


def _path(*parts: str) -> Path:
    root = reference_dir()
    if not root.is_dir():
        raise ReferenceNotFoundError(f"reference folder {root} does not exist (set ${ENV_VAR} to its location)")
    path = root.joinpath(*parts)
    if not path.exists():
        raise ReferenceNotFoundError(f"reference file {path} does not exist")
    return path


def _read_json(path: Path) -> Any:
    """A JSON file, or the single JSON file inside a ``.zip`` (as posteriordb ships them)."""
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                return json.loads(zf.read(zf.namelist()[0]))
        return json.loads(path.read_text())
    except (OSError, ValueError, zipfile.BadZipFile, IndexError) as e:
        raise AmortizeError(f"reference file {path} cannot be read: {e}") from None


def eight_schools(dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Eight schools data and posteriordb's reference draws (Stan NUTS, 10 chains x 1000 draws).

    Model: ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``, ``theta[j] ~ N(mu, tau)``, ``y[j] ~ N(theta[j], sigma[j])``.

    Args:
        dtype: floating dtype of the tensors; default ``torch.get_default_dtype()``.

    Returns:
        ``(y [8], sigma [8], draws)`` with draws ``{"mu": [10000], "tau": [10000], "theta": [10000, 8]}``,
        chain-major (chain c holds draws ``1000c .. 1000c + 999``).

    Raises:
        ReferenceNotFoundError: the reference folder or a file is missing (names the path).
    """
    dtype = dtype or torch.get_default_dtype()
    folder = "posteriordb/eight_schools-eight_schools_noncentered"
    data = _read_json(_path(folder, "eight_schools.json.zip"))
    chains = _read_json(_path(folder, "reference_draws.json.zip"))  # list of {param: [1000 draws]}
    y = torch.tensor(data["y"], dtype=dtype)
    sigma = torch.tensor(data["sigma"], dtype=dtype)
    j = int(data["J"])

    def cat(name: str) -> torch.Tensor:
        return torch.tensor([v for chain in chains for v in chain[name]], dtype=dtype)

    draws = {
        "mu": cat("mu"),
        "tau": cat("tau"),
        "theta": torch.stack([cat(f"theta[{i}]") for i in range(1, j + 1)], dim=-1),  # [10000, 8]
    }
    return y, sigma, draws


@dataclass
class RadonData:
    """Inference Gym's Minnesota radon data (919 houses in 85 counties), as tensors.

    Attributes:
        log_radon: ``[N]`` log radon activity (activity <= 0 set to 0.1 first).
        floor: ``[N]`` 0 = basement, 1 = first floor.
        county: ``[N]`` 0-based county index, counties sorted by name.
        log_uranium: ``[N]`` log soil uranium of the house's county (repeated per house).
        floor_by_county: ``[N]`` mean ``floor`` of the house's county.
        county_log_uranium: ``[J]`` log uranium per county.
        county_floor_mean: ``[J]`` mean floor per county.
        county_names: ``J`` county names, in index order.
    """

    log_radon: torch.Tensor
    floor: torch.Tensor
    county: torch.Tensor
    log_uranium: torch.Tensor
    floor_by_county: torch.Tensor
    county_log_uranium: torch.Tensor
    county_floor_mean: torch.Tensor
    county_names: list[str]

    @property
    def num_counties(self) -> int:
        """Number of counties J."""
        return len(self.county_names)

    def to_hierarchical_data(self) -> HierarchicalData:
        """One level ``"county"``; covariates ``log_uranium``, ``floor_mean`` (county) and ``floor`` (obs)."""
        return HierarchicalData(
            ["county"],
            {},
            self.county,
            y=self.log_radon,
            covariates={
                "county": {"log_uranium": self.county_log_uranium, "floor_mean": self.county_floor_mean},
                "obs": {"floor": self.floor},
            },
            labels={"county": self.county_names},
            response="log_radon",
            dtype=self.log_radon.dtype,
        )


def radon_minnesota(prior: str = "uniform", dtype: torch.dtype | None = None) -> tuple[RadonData, ReferenceMoments]:
    """Inference Gym's radon contextual-effects model, Minnesota: data and reference posterior mean/sd.

    The model (Inference Gym's names, used unchanged as Pyro site names)::

        county_effect_mean ~ N(0, 1)
        county_effect_scale ~ Uniform(0, 100)        # prior="halfnormal": HalfNormal(1)
        county_effect[j] ~ N(county_effect_mean, county_effect_scale)   # plate "county", J = 85
        weight ~ N(0, 1), shape [3]                  # (log_uranium, floor, floor_by_county)
        log_radon_scale ~ Uniform(0, 100)            # prior="halfnormal": HalfNormal(1)
        log_radon[n] ~ N(weight[0] log_uranium[n] + weight[1] floor[n] + weight[2] floor_by_county[n]
                         + county_effect[county[n]], log_radon_scale)

    In Pyro, with ``data = radon.to_hierarchical_data()``: global sites ``county_effect_mean``,
    ``county_effect_scale``, ``weight`` (``dist.Normal(0., 1.).expand([3]).to_event(1)``) and
    ``log_radon_scale``; ``county_effect`` in ``pyro.plate("county", 85)``; the likelihood in
    ``pyro.plate("obs", N)`` with ``county_effect[..., data.index("county")]`` and the county
    covariates gathered the same way. Any parameterization of ``county_effect`` has this posterior.
    The reference is CmdStan NUTS, 10 chains x 20000 draws, by the Inference Gym authors.

    Args:
        prior: ``"uniform"`` (the original target) or ``"halfnormal"`` scale priors.
        dtype: floating dtype of the tensors; default ``torch.get_default_dtype()``.

    Returns:
        ``(data, moments)``: the data, and mean/sd/MCSE for ``county_effect_mean`` ``[]``,
        ``county_effect_scale`` ``[]``, ``county_effect`` ``[85]``, ``weight`` ``[3]`` and
        ``log_radon_scale`` ``[]``.

    Raises:
        ConfigError: unknown ``prior`` (a ValueError).
        ReferenceNotFoundError: the reference folder or a file is missing (names the path).
    """
    files = {"uniform": "ground_truth.json", "halfnormal": "ground_truth_halfnormal.json"}
    if prior not in files:
        raise ConfigError(f"radon_minnesota: prior must be one of {sorted(files)}, got {prior!r}")
    dtype = dtype or torch.get_default_dtype()
    folder = "inference_gym/radon_contextual_effects_minnesota"
    raw = _read_json(_path(folder, "data.json"))
    truth = _read_json(_path(folder, files[prior]))["parameters"]
    county = torch.tensor(raw["county"], dtype=torch.long)
    j = int(raw["num_counties"])

    def f(key: str) -> torch.Tensor:
        return torch.tensor(raw[key], dtype=dtype)

    log_uranium, floor_by_county = f("log_uranium"), f("floor_by_county")
    per_county = {}
    for name, values in (("log_uranium", log_uranium), ("floor_by_county", floor_by_county)):
        per = torch.zeros(j, dtype=dtype).index_copy(0, county, values)  # [J]: any house's value
        if not torch.allclose(per[county], values):
            raise AmortizeError(f"reference file {folder}/data.json: '{name}' is not constant within counties")
        per_county[name] = per
    data = RadonData(
        log_radon=f("log_radon"),
        floor=f("floor"),
        county=county,
        log_uranium=log_uranium,
        floor_by_county=floor_by_county,
        county_log_uranium=per_county["log_uranium"],
        county_floor_mean=per_county["floor_by_county"],
        county_names=list(raw["county_names"]),
    )

    def stat(key: str) -> dict[str, torch.Tensor]:
        return {name: torch.tensor(p[key], dtype=dtype) for name, p in truth.items()}

    return data, ReferenceMoments(mean=stat("mean"), sd=stat("sd"), mean_mcse=stat("mean_mcse"))
