"""Row-sparse gradients for embedding tables: backward writes only the rows of the batch's tokens.

A dense embedding backward allocates and zero-fills a table-sized gradient (47 MB for MiniLM's 30,522 x 384
words) to add a few hundred rows into it; full fine-tuning then frees it again every step. ID3 never needs
that table: only the rows of tokens in the batch can score above zero, and the optimizer reads unmasked
entries only. `RowSparseEmbeddings` swaps the embedding's backward for one that returns a sparse COO gradient
(one index per distinct token row, a dense block of those rows' values). Its values are summed exactly as
torch's dense CPU kernel sums them (each row from 0.0, tokens in batch order), so on CPU the gradient is
bitwise the dense one with the zero rows left out (tested); gradient accumulation stays bitwise too
(`coalesced_rows` sums the micro-batches in order, like `grad += new`).

Where it applies: float32 `nn.Embedding` weights that only that module uses (a table tied to an output layer
gets a dense gradient there anyway) and without `scale_grad_by_freq`. Everything in this package that reads
gradients (scoring, masking, `SparseAdamW`, the gradient norm and clipping) accepts the sparse layout;
`torch.nn.utils.clip_grad_norm_` does not, so clip with `ID3Engine.clip_grad_norm_` (ID3Trainer does).

Example:
    >>> emb = nn.Embedding(100, 4)
    >>> handle = RowSparseEmbeddings({"w": emb})
    >>> emb(torch.tensor([[3, 3, 7]])).sum().backward()
    >>> emb.weight.grad.layout, coalesced_rows(emb.weight.grad)[0].tolist()
    (torch.sparse_coo, [3, 7])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


class _RowSparseEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(input)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return F.embedding(input, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (input,) = ctx.saved_tensors
        index = input.reshape(-1)
        grad = grad_out.reshape(index.numel(), -1)
        if ctx.padding_idx is not None:  # the padding row never receives a gradient, as in nn.Embedding
            keep = index != ctx.padding_idx
            index, grad = index[keep], grad[keep]
        rows, slot = torch.unique(index, sorted=True, return_inverse=True)
        # index_add_ adds the tokens in batch order onto zeros: the dense kernel's order, so the same bits.
        values = grad.new_zeros(rows.numel(), grad.shape[1]).index_add_(0, slot, grad)
        sparse = torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, ctx.shape, is_coalesced=True, check_invariants=False
        )
        return None, sparse, None


def row_sparse_candidates(model: nn.Module, params: dict[str, nn.Parameter], min_entries: int) -> dict:
    """{parameter name: its nn.Embedding} for the tables whose gradient can be made row-sparse (see module doc)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    by_weight = {
        id(m.weight): m
        for m in model.modules()
        if isinstance(m, nn.Embedding) and not m.sparse and not m.scale_grad_by_freq
    }
    return {
        name: by_weight[id(p)]
        for name, p in params.items()
        if id(p) in by_weight
        and owners.get(id(p)) == 1
        and p.dtype == torch.float32
        and p.dim() == 2
        and p.numel() >= min_entries
    }


class RowSparseEmbeddings:
    """Forward hooks that give these embeddings row-sparse gradients until `remove()`.

    A hook re-gathers the output (a few hundred rows; no table-sized work) through `_RowSparseEmbedding`,
    whose backward builds the sparse gradient. Without grad mode (evaluation) the module runs unchanged.
    """

    def __init__(self, modules: dict[str, nn.Embedding]) -> None:
        self.modules = dict(modules)
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules.values()]

    @staticmethod
    def _hook(module: nn.Embedding, args: tuple, kwargs: dict, output: torch.Tensor):
        if not (torch.is_grad_enabled() and module.weight.requires_grad):
            return None
        input = args[0] if args else kwargs["input"]
        return _RowSparseEmbedding.apply(input, module.weight, module.padding_idx)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def coalesced_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct row indices, their values as a (rows, width) block) of a row-sparse COO gradient.

    An accumulated gradient (several backwards) lists each backward's rows in turn; they are summed in that
    order, onto zeros, which is what `grad += new` does to a dense gradient.
    """
    if grad.sparse_dim() != 1:
        raise ValueError(f"expected a row-sparse gradient (sparse_dim 1), got sparse_dim {grad.sparse_dim()}")
    width = grad.shape[1:].numel()
    if grad.is_coalesced():
        return grad._indices()[0], grad._values().reshape(-1, width)
    index, values = grad._indices()[0], grad._values().reshape(-1, width)
    rows, slot = torch.unique(index, sorted=True, return_inverse=True)
    return rows, values.new_zeros(rows.numel(), width).index_add_(0, slot, values)


def as_coalesced(grad: torch.Tensor) -> torch.Tensor:
    """`grad` as a coalesced row-sparse tensor (itself if it already is one)."""
    if grad.is_coalesced():
        return grad
    rows, values = coalesced_rows(grad)
    values = values.reshape(rows.numel(), *grad.shape[1:])
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, grad.shape, is_coalesced=True, check_invariants=False
    )


def locate(
    rows: torch.Tensor, width: int, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For flat entry indices of the table: (position of each entry's row in `rows`, its column, whether the
    row is present). Entries whose row is absent have gradient exactly 0."""
    row, col = index // width, index % width
    if rows.numel() == 0:
        return torch.zeros_like(row), col, torch.zeros_like(row, dtype=torch.bool)
    pos = torch.searchsorted(rows, row).clamp_(max=rows.numel() - 1)
    return pos, col, rows[pos] == row


def gather_entries(grad: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`grad.reshape(-1)[index]` for a dense or a row-sparse gradient (absent rows read as 0)."""
    if not grad.is_sparse:
        return grad.reshape(-1)[index]
    rows, values = coalesced_rows(grad)
    pos, col, hit = locate(rows, values.shape[1], index)
    out = values.new_zeros(index.numel())
    out[hit] = values[pos[hit], col[hit]]
    return out


def mask_rows_(grad: torch.Tensor, index: torch.Tensor) -> None:
    """Zero every entry of a coalesced row-sparse gradient except the flat entries `index`, in place."""
    rows, values = coalesced_rows(grad)
    pos, col, hit = locate(rows, values.shape[1], index)
    pos, col = pos[hit], col[hit]
    kept = values[pos, col]
    values.zero_()
    values[pos, col] = kept
