"""Per-entry importance scores. Each function maps one chunk of (gradient, weight) to float32 scores."""

from __future__ import annotations

import torch


def d3_scores(grad: torch.Tensor, weight: torch.Tensor, eps: float = 1e-3, exp: float = 1.0) -> torch.Tensor:
    """D3 score |g| / (|theta| + eps)^exp, in float32.

    Large gradients on small weights score highest: such entries move the loss most per unit of relative change.

    Example:
        >>> d3_scores(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0]), eps=1.0, exp=1.0)
        tensor([1., 1.])
    """
    scores = grad.abs() if grad.dtype == torch.float32 else grad.float().abs_()
    if exp == 0:
        return scores
    denom = weight.abs() if weight.dtype == torch.float32 else weight.float().abs_()
    denom.add_(eps)
    if exp != 1:
        denom.pow_(exp)
    return scores.div_(denom)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Score of the magnitude-only methods (PaFi): the smallest |theta| first, so the score is -|theta|."""
    return weight.float().abs().neg_()
