"""The files the ``amortize`` commands write: draws as CSV or ArviZ NetCDF, reports as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import write_text
from ..posterior import Posterior
from ..rundir import make_dirs, remove_half_made
from ..validate.results import json_safe


def _draws_csv(draws: dict[str, torch.Tensor]) -> str:
    """One row per draw, one column per site element: ``mu``, ``theta[3]``, ``beta[1,2]``."""
    names, cols = ["draw"], []
    n = next(iter(draws.values())).shape[0]
    for site, v in draws.items():
        flat = v.reshape(n, -1).double().cpu().numpy()
        shape = tuple(v.shape[1:])
        names += [site] if not shape else [f"{site}[{','.join(map(str, i))}]" for i in np.ndindex(*shape)]
        cols.append(flat)
    table = np.concatenate([np.arange(n)[:, None].astype(float)] + cols, axis=1)
    lines = [",".join(f'"{c}"' if "," in c else c for c in names)]
    lines += [f"{int(row[0])}," + ",".join(f"{x:.9g}" for x in row[1:]) for row in table]
    return "\n".join(lines) + "\n"


def _write_netcdf(
    post: Posterior, path: Path, num_samples: int, seed: int, correct: bool = False, record: dict | None = None
) -> None:
    """Write the full InferenceData as ArviZ NetCDF atomically, the command's diagnostics ``record``
    (pooled Pareto k, its sets, the decision) in ``sample_stats`` attributes as ``diagnostics_*``; a
    failed write (disk full) names ``path`` and leaves neither a temporary file nor the folders made for it."""
    idata = post.to_arviz(num_samples, seed, correct=correct)
    for key, value in (record or {}).items():
        if isinstance(value, bool):
            value = int(value)  # NetCDF attributes hold numbers, strings and lists of them
        if isinstance(value, list):
            value = [v for v in value if isinstance(v, (int, float))] if key != "flags" else "; ".join(value)
        if isinstance(value, dict):
            value = json.dumps(value)  # per-level k: a JSON string
        if value is not None:
            idata.sample_stats.attrs[f"diagnostics_{key}"] = value
    made = make_dirs(path.parent, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        idata.to_netcdf(str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
        if not path.exists():
            remove_half_made(path.parent, made, files=False)


def _write_json(path: str | os.PathLike, payload: Any) -> Path:
    """``payload`` as JSON (tensors as lists, non-finite numbers as null), written atomically."""
    write_text(path, json.dumps(json_safe(payload), indent=1, allow_nan=False))
    return Path(path)
