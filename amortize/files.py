"""Files of results: JSON-safe values, JSON written atomically, folders made for a file and removed again.

:func:`json_safe` turns tensors, arrays and numpy scalars into plain lists and numbers (non-finite
floats into ``null``), so that ``json.dumps(..., allow_nan=False)`` takes any result; :func:`write_json`
writes such a file atomically (readers see the old file or the new one). :func:`make_dirs` makes a
folder and says which it made; :func:`remove_empty` removes those of them a failed write left empty.

Example:
    >>> json_safe({"z": torch.tensor([0.5, float("nan")])})
    {'z': [0.5, None]}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import write_text

__all__ = ["json_safe", "write_json", "make_dirs", "remove_empty"]


def json_safe(x: Any) -> Any:
    """``x`` with tensors and arrays as lists, numpy scalars as Python numbers, tuples as lists and
    non-finite floats as None (JSON ``null``), dict keys as strings."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return json_safe(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """``payload`` as JSON (tensors as lists, non-finite numbers as null), written atomically; returns ``path``.

    Raises:
        OSError: the write failed; its ``filename`` is ``path``, which is left as it was.
    """
    write_text(path, json.dumps(json_safe(payload), indent=1, allow_nan=False))
    return Path(path)


def make_dirs(folder: Path, exist_ok: bool) -> list[Path]:
    """``mkdir -p folder``; returns the folders it made, outermost first (for :func:`remove_empty`).

    Raises:
        FileExistsError: ``folder`` exists and not ``exist_ok``.
        OSError: it cannot be made (names it).
    """
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(folder)) from None
    return missing


def remove_empty(made: Sequence[Path]) -> None:
    """Remove the folders in ``made`` (from :func:`make_dirs`) that are empty, innermost first."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
