"""The shared reference folder: where it is, and the data files of the shipped models in it.

The folder is ``$AMORTIZE_REFERENCE`` if set, else ``<repo root>/experiments/data/reference`` (the repo
root being the folder above the ``amortize`` package), which ships with the project with the licences
and provenance of every file. Its READMEs describe every model and file; the numbers there were
produced outside this project. The ground-truth posteriors in it are read by
:mod:`amortize.validate.reference`; this module reads what the models need (the Minnesota radon data).

Example:
    >>> minnesota_radon().num_counties  # doctest: +SKIP
    85
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
from ..errors import AmortizeError, ReferenceNotFoundError

__all__ = ["ENV_VAR", "reference_dir", "reference_path", "read_json", "RadonData", "minnesota_radon", "RADON_FOLDER"]

ENV_VAR = "AMORTIZE_REFERENCE"
RADON_FOLDER = "inference_gym/radon_contextual_effects_minnesota"


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


def reference_path(*parts: str) -> Path:
    """A file of the reference folder.

    Raises:
        ReferenceNotFoundError: the folder or the file is missing (names the path).
    """
    root = reference_dir()
    if not root.is_dir():
        raise ReferenceNotFoundError(f"reference folder {root} does not exist (set ${ENV_VAR} to its location)")
    path = root.joinpath(*parts)
    if not path.exists():
        raise ReferenceNotFoundError(f"reference file {path} does not exist")
    return path


def read_json(path: Path) -> Any:
    """A JSON file, or the single JSON file inside a ``.zip`` (as posteriordb ships them).

    Raises:
        AmortizeError: the file cannot be read or parsed (names the file).
    """
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                return json.loads(zf.read(zf.namelist()[0]))
        return json.loads(path.read_text())
    except (OSError, ValueError, zipfile.BadZipFile, IndexError) as e:
        raise AmortizeError(f"reference file {path} cannot be read: {e}") from None


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


def minnesota_radon(dtype: torch.dtype | None = None) -> RadonData:
    """Inference Gym's Minnesota radon data (``data.json`` of :data:`RADON_FOLDER`), counties sorted by name.

    Args:
        dtype: floating dtype of the tensors; default ``torch.get_default_dtype()``.

    Raises:
        ReferenceNotFoundError: the reference folder or the file is missing (names the path).
        AmortizeError: a county-level covariate varies within a county (names the file and column).
    """
    dtype = dtype or torch.get_default_dtype()
    raw = read_json(reference_path(RADON_FOLDER, "data.json"))
    county = torch.tensor(raw["county"], dtype=torch.long)
    j = int(raw["num_counties"])

    def f(key: str) -> torch.Tensor:
        return torch.tensor(raw[key], dtype=dtype)

    log_uranium, floor_by_county = f("log_uranium"), f("floor_by_county")
    per_county = {}
    for name, values in (("log_uranium", log_uranium), ("floor_by_county", floor_by_county)):
        per = torch.zeros(j, dtype=dtype).index_copy(0, county, values)  # [J]: any house's value
        if not torch.allclose(per[county], values):
            raise AmortizeError(f"reference file {RADON_FOLDER}/data.json: '{name}' is not constant within counties")
        per_county[name] = per
    return RadonData(
        log_radon=f("log_radon"),
        floor=f("floor"),
        county=county,
        log_uranium=log_uranium,
        floor_by_county=floor_by_county,
        county_log_uranium=per_county["log_uranium"],
        county_floor_mean=per_county["floor_by_county"],
        county_names=list(raw["county_names"]),
    )
