"""Bijections the guide's heads build on, beyond those Pyro ships."""

from __future__ import annotations

import torch
from torch.distributions import Transform, constraints

__all__ = ["CholeskyAffine"]


class CholeskyAffine(Transform):
    """``y = loc + L x`` with a batch of lower-triangular ``L [..., D, D]`` (positive diagonal)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        super().__init__(cache_size=1)
        self.loc, self.scale_tril = loc, scale_tril

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + (self.scale_tril @ x.unsqueeze(-1)).squeeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        diff = (y - self.loc).unsqueeze(-1)
        L = self.scale_tril.expand(*diff.shape[:-2], *self.scale_tril.shape[-2:])
        return torch.linalg.solve_triangular(L, diff, upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ladj = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return ladj.expand(x.shape[:-1])
