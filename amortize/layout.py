"""Index arrays of grouping factors: each factor a chain of nested levels (outermost first), each
chain's innermost level indexed per row. A nested design is one factor; a crossed design
(persons x items) is several, whose innermost groups meet in the rows.

Pure functions on index tensors, used by :class:`~amortize.HierarchicalData`: the checks that give
each level its number of groups (naming the level and the group at fault) and the walk from a unit to
the group above it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import DataError
from .values import OBS

__all__ = [
    "chain_of",
    "check_factors",
    "chain_sizes",
    "covering_rows",
    "rows_key",
    "structure_counts",
    "structure_flags",
    "walk_index",
]


def check_factors(levels: tuple[str, ...], factors: Sequence[Sequence[str]] | None) -> tuple[tuple[str, ...], ...]:
    """The factors as tuples of level names; None: one factor, ``levels`` itself. Every level lies in
    exactly one factor, and ``levels`` is the factors' levels, factor by factor.

    Raises:
        DataError: a level in no factor or in two, or factors that are not ``levels`` in order.
    """
    if factors is None:
        return (tuple(levels),)
    chains = tuple(tuple(chain) for chain in factors)
    if not chains or any(not chain for chain in chains):
        raise DataError(f"factors: each factor needs at least one level, got {[list(c) for c in chains]}")
    flat = [lvl for chain in chains for lvl in chain]
    twice = sorted({lvl for lvl in flat if flat.count(lvl) > 1})
    if twice:
        raise DataError(f"factors: level(s) {twice} belong to two factors; each level has one chain of parents")
    if tuple(flat) != tuple(levels):
        raise DataError(f"factors {[list(c) for c in chains]} do not list the levels {list(levels)} in order")
    return chains


def chain_of(factors: tuple[tuple[str, ...], ...], level: str) -> tuple[str, ...]:
    """The factor (chain of levels) that holds ``level``."""
    for chain in factors:
        if level in chain:
            return chain
    raise DataError(f"unknown level '{level}'; levels are {[lvl for c in factors for lvl in c]}")


def chain_sizes(
    chain: tuple[str, ...],
    parents: Mapping[str, torch.Tensor],
    rows: torch.Tensor,
    labels: Mapping[str, Sequence[Any]],
) -> dict[str, int]:
    """``{level: number of groups}`` of one factor, checked: every index points to a group, and every
    group has members (ids dense 0..G-1); ``rows`` is the innermost group of each row.

    Raises:
        DataError: naming the level and the group at fault.
    """
    sizes: dict[str, int] = {}
    children: list[tuple[str, torch.Tensor | None]] = [(lvl, parents.get(lvl)) for lvl in chain[1:]]
    children.append((OBS, rows))
    for (child, idx), lvl in zip(children, chain):
        if idx is None:
            raise DataError(f"level '{child}': parent index into level '{lvl}' is missing")
        if idx.numel() == 0:
            raise DataError(f"level '{lvl}': no groups (empty data)")
        if int(idx.min()) < 0:
            raise DataError(f"level '{child}': negative index into level '{lvl}'")
        n = len(labels[lvl]) if lvl in labels else int(idx.max()) + 1
        if int(idx.max()) >= n:
            raise DataError(f"level '{child}': index {int(idx.max())} points to no group of level '{lvl}' (it has {n})")
        members = "observations" if child == OBS else child + " groups"
        if n > idx.numel():  # more groups than members: some are empty (found without an [n] array)
            present = torch.unique(idx)
            gaps = torch.nonzero(present != torch.arange(len(present)))
            g = int(gaps[0]) if len(gaps) else len(present)
        else:
            counts = torch.bincount(idx, minlength=n)
            g = int(torch.nonzero(counts == 0)[0]) if bool((counts == 0).any()) else -1
        if g >= 0:
            label = labels[lvl][g] if lvl in labels else g
            raise DataError(
                f"level '{lvl}': group {label!r} has no {members} ({n} groups for {idx.numel()} members;"
                " ids must be dense 0..G-1 with no gaps)"
            )
        sizes[lvl] = n
        if child != OBS and child in labels and len(labels[child]) != idx.numel():
            raise DataError(f"level '{child}': {len(labels[child])} labels for {idx.numel()} groups")
    return sizes


def walk_index(
    chain: tuple[str, ...], parents: Mapping[str, torch.Tensor], rows: torch.Tensor, level: str, at: str
) -> torch.Tensor:
    """Index ``[size(at)]`` of the ``level`` group of each unit of ``at`` (a level below it in the chain,
    or the rows, ``"obs"``).

    Raises:
        DataError: ``at`` is not below ``level`` in ``level``'s factor.
    """
    order = list(chain) + [OBS]
    if level not in chain or at not in order or order.index(at) <= order.index(level):
        raise DataError(f"index: level '{level}' is not above '{at}' (levels {list(chain)})")
    if at == OBS:
        idx, cur = rows, len(chain) - 1
    else:
        idx, cur = parents[at], order.index(at) - 1
    while cur > order.index(level):
        idx, cur = parents[chain[cur]][idx], cur - 1
    return idx


def covering_rows(row_index: Mapping[str, torch.Tensor], n_rows: int) -> torch.Tensor:
    """The fewest rows found greedily (in row order) such that every innermost group of every factor
    keeps one: the first row of each group, united over the factors, sorted."""
    device = next(iter(row_index.values())).device
    keep = torch.zeros(n_rows, dtype=torch.bool, device=device)
    for idx in row_index.values():
        G = int(idx.max()) + 1
        first = torch.full((G,), n_rows, dtype=torch.long, device=device)
        first = first.scatter_reduce(0, idx, torch.arange(n_rows, device=device), "amin")
        keep[first] = True
    return torch.nonzero(keep).flatten()


def structure_counts(data: Any) -> dict[str, list[int]]:
    """The quantities the structure's range flags compare, ``[min, max]`` each, for every factor of a
    :class:`~amortize.HierarchicalData` (its declared levels, not an implicit row level): the groups of
    the factor's outermost level (``[G, G]``), the children per parent group of each inner level, and
    the rows per innermost group (key ``"obs"``; crossed: ``"obs:<level>"`` per factor)."""
    data = data.declared()
    out: dict[str, list[int]] = {}
    for chain in data.factors:
        out[chain[0]] = [data.size(chain[0])] * 2
        for above, lvl in zip(chain, chain[1:]):
            c = torch.bincount(data.parent_index(lvl), minlength=data.size(above))
            out[lvl] = [int(c.min()), int(c.max())]
        c = data.counts(chain[-1])
        out[rows_key(data.factors, chain[-1])] = [int(c.min()), int(c.max())]
    return out


def rows_key(factors: tuple[tuple[str, ...], ...], innermost: str) -> str:
    """The key of the rows per ``innermost`` group in :func:`structure_counts`."""
    return OBS if len(factors) == 1 else f"{OBS}:{innermost}"


def structure_flags(data: Any, ranges: Mapping[str, Any]) -> list[str]:
    """What in ``data``'s structure (:func:`structure_counts`) lies outside the trained ``ranges``."""
    flags = []
    data = data.declared()
    for chain in data.factors:
        above = dict(zip(chain[1:], chain))
        for key, (lo_d, hi_d) in structure_counts(data).items():
            if key not in ranges or (key not in chain and key != rows_key(data.factors, chain[-1])):
                continue
            lo, hi = ranges[key]
            if lo_d >= lo and hi_d <= hi:
                continue
            if key == chain[0]:
                flags.append(f"level '{key}': {lo_d} groups, trained on {lo}-{hi}")
            elif key in above:
                flags.append(f"level '{key}': {lo_d}-{hi_d} per '{above[key]}' group, trained on {lo}-{hi}")
            else:
                flags.append(f"observations: {lo_d}-{hi_d} per '{chain[-1]}' group, trained on {lo}-{hi}")
    return flags
