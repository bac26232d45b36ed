"""Per-entry importance scores. Each function maps one chunk of (gradient, weight) to float32 scores."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch


def d3_scores(
    grad: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-3,
    exp: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """D3 score |g| / (|theta| + eps)^exp, in float32.

    Large gradients on small weights score highest: such entries move the loss most per unit of relative change.
    `out` (float32, same number of entries) receives the scores without allocating; the values are bitwise
    the same either way (|g / d| == |g| / d in IEEE arithmetic).

    Example:
        >>> d3_scores(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0]), eps=1.0, exp=1.0)
        tensor([1., 1.])
    """
    if out is not None:
        out = out.view(grad.shape)
        if exp == 0:
            return torch.abs(grad, out=out) if grad.dtype == out.dtype else out.copy_(grad).abs_()
        (torch.abs(weight, out=out) if weight.dtype == out.dtype else out.copy_(weight).abs_()).add_(eps)
        if exp != 1:
            out.pow_(exp)
        return torch.div(grad, out, out=out).abs_()
    scores = grad.abs() if grad.dtype == torch.float32 else grad.float().abs_()
    if exp == 0:
        return scores
    denom = weight.abs() if weight.dtype == torch.float32 else weight.float().abs_()
    denom.add_(eps)
    if exp != 1:
        denom.pow_(exp)
    return scores.div_(denom)


def d3_settings(score_fn: Callable) -> tuple[float, float] | None:
    """(eps, exp) if `score_fn` is `d3_scores` (or a `functools.partial` of it), else None.

    The engine's fast paths rely on two D3 facts: a zero gradient scores 0 (or NaN) whatever the weight, so
    rows of an embedding that no token touched need no scoring, and scores can be written into a buffer.

    Example:
        >>> d3_settings(partial(d3_scores, eps=1e-2, exp=2.0))
        (0.01, 2.0)
    """
    if score_fn is d3_scores:
        return 1e-3, 1.0
    if isinstance(score_fn, partial) and score_fn.func is d3_scores and not score_fn.args:
        keywords = score_fn.keywords
        if set(keywords) <= {"eps", "exp"}:
            return float(keywords.get("eps", 1e-3)), float(keywords.get("exp", 1.0))
    return None


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Score of the magnitude-only methods (PaFi): the smallest |theta| first, so the score is -|theta|."""
    return weight.float().abs().neg_()
