"""Loaders of external ground truth (posteriordb draws, Inference Gym moments) from the reference folder.

The folder is found by :func:`~amortize.models.reference_data.reference_dir` (``$AMORTIZE_REFERENCE``
or ``<repo root>/experiments/data/reference``, shipped with the project); its READMEs describe every
model and file. The numbers there were produced outside this project, so they are ground truth
nobody here computed.

Example:
    >>> y, sigma, draws = eight_schools()  # doctest: +SKIP
    >>> float(draws["mu"].mean())  # doctest: +SKIP
    4.41...
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, ReferenceNotFoundError
from ..models.reference_data import RADON_FOLDER, RadonData, minnesota_radon, read_json, reference_dir, reference_path
from .metrics import ReferenceMoments

__all__ = [
    "ReferenceNotFoundError",
    "reference_dir",
    "eight_schools",
    "RadonData",
    "radon_minnesota",
]


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
    data = read_json(reference_path(folder, "eight_schools.json.zip"))
    chains = read_json(reference_path(folder, "reference_draws.json.zip"))  # list of {param: [1000 draws]}
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
    data = minnesota_radon(dtype)
    truth = read_json(reference_path(RADON_FOLDER, files[prior]))["parameters"]

    def stat(key: str) -> dict[str, torch.Tensor]:
        return {name: torch.tensor(p[key], dtype=dtype) for name, p in truth.items()}

    return data, ReferenceMoments(mean=stat("mean"), sd=stat("sd"), mean_mcse=stat("mean_mcse"))
