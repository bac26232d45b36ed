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

A table tied to the output layer (most causal LMs, T5) gets a dense gradient from that layer; in the
low-memory mode `TiedOutputStreams` scores that part block by block as backward computes it, so the
table's gradient is never built whole either.

Example:
    >>> emb = nn.Embedding(100, 4)
    >>> handle = RowSparseEmbeddings({"w": emb})
    >>> emb(torch.tensor([[3, 3, 7]])).sum().backward()
    >>> emb.weight.grad.layout, coalesced_rows(emb.weight.grad)[0].tolist()
    (torch.sparse_coo, [3, 7])
"""

from __future__ import annotations

from collections.abc import Callable

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
        rows, values = embedding_rows(input, grad_out, ctx.padding_idx)
        return None, row_sparse_gradient(rows, values, ctx.shape), None


def row_sparse_gradient(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The table's gradient as a coalesced sparse tensor: `values` (|rows| x d) at the sorted distinct `rows`."""
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False
    )


def embedding_rows(
    input: torch.Tensor, grad_out: torch.Tensor, padding_idx: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct token rows, their gradient block) of an embedding lookup's weight gradient: the
    nonzero rows of nn.Embedding's dense gradient, bitwise on CPU."""
    index = input.reshape(-1)
    grad = grad_out.reshape(index.numel(), -1)
    if padding_idx is not None:  # the padding row never receives a gradient, as in nn.Embedding
        keep = index != padding_idx
        index, grad = index[keep], grad[keep]
    rows, slot = torch.unique(index, sorted=True, return_inverse=True)
    # index_add_ adds the tokens in batch order onto zeros: the dense kernel's order, so the same bits.
    return rows, grad.new_zeros(rows.numel(), grad.shape[1]).index_add_(0, slot, grad)


def _holders(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(parameter) -> the modules that hold it (a tied table has several)."""
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(module)
    return holders


def _plain_embedding(module: nn.Module, p: nn.Parameter) -> bool:
    """`module` is an nn.Embedding with weight `p` whose backward `_RowSparseEmbedding` reproduces."""
    return (
        isinstance(module, nn.Embedding)
        and module.weight is p
        and not module.sparse
        and not module.scale_grad_by_freq
    )


def _large_fp32_table(p: nn.Parameter, min_entries: int) -> bool:
    return p.dtype == torch.float32 and p.dim() == 2 and p.numel() >= min_entries


def row_sparse_candidates(model: nn.Module, params: dict[str, nn.Parameter], min_entries: int) -> dict:
    """{parameter name: its nn.Embedding} for the tables whose gradient can be made row-sparse (see module doc)."""
    holders = _holders(model)
    out = {}
    for name, p in params.items():
        found = holders.get(id(p), [])
        if len(found) == 1 and _plain_embedding(found[0], p) and _large_fp32_table(p, min_entries):
            out[name] = found[0]
    return out


def tied_output_candidates(model: nn.Module, params: dict[str, nn.Parameter], min_entries: int) -> dict:
    """{parameter name: (its nn.Embedding modules, its output nn.Linear)} for tables used by embeddings and one
    output layer and nothing else (tied input and output embeddings, as in most causal LMs and T5, whose encoder
    and decoder each hold an embedding module on the shared table): see `TiedOutputStreams`."""
    holders = _holders(model)
    out = {}
    for name, p in params.items():
        found = holders.get(id(p), [])
        embeddings = [m for m in found if _plain_embedding(m, p)]
        heads = [m for m in found if type(m) is nn.Linear and m.weight is p]
        if (
            embeddings
            and len(heads) == 1
            and len(embeddings) + 1 == len(found)
            and heads[0].bias is None  # its gradient would be one more sum to reproduce bit for bit
            and _large_fp32_table(p, min_entries)
        ):
            out[name] = (tuple(embeddings), heads[0])
    return out


# Output-layer gradient blocks have at least this many rows. MKL computes a product of a handful of rows with
# other kernels, whose sums round differently (measured: 1-8 rows differ from the whole product on 1 thread,
# 9 on 2 threads; 12 and up match); from 32 rows up every block is bitwise the rows of the whole product.
MIN_BLOCK_ROWS = 32


def _row_sparse_lookup(
    module: nn.Embedding, args: tuple, kwargs: dict, on_input: Callable | None = None
) -> torch.Tensor | None:
    """A forward hook's replacement output: the same lookup through `_RowSparseEmbedding` (a few hundred rows
    gathered again, no table-sized work), or None (output unchanged) without grad mode, e.g. in evaluation.
    `on_input` receives the token ids (detached) of each lookup it replaces."""
    if not (torch.is_grad_enabled() and module.weight.requires_grad):
        return None
    input = args[0] if args else kwargs["input"]
    if on_input is not None:
        on_input(input.detach())
    return _RowSparseEmbedding.apply(input, module.weight, module.padding_idx)


class _StreamedOutput(torch.autograd.Function):
    """`F.linear(input, weight)` whose weight gradient is handed to a `_TiedTable` (see `TiedOutputStreams`)."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, table: _TiedTable) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        ctx.table = table
        return F.linear(input, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        input, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        h = input.reshape(-1, input.shape[-1])
        # The products autograd's linear backward computes, in the same layout (bitwise the same on CPU).
        grad_input = g.mm(weight).view(input.shape) if ctx.needs_input_grad[0] else None
        return grad_input, ctx.table.weight_grad(g, h), None


class _TiedTable:
    """One tied table's state for the forward in progress: the token ids its embedding saw, and how many times
    its output layer ran (with grad)."""

    def __init__(
        self,
        name: str,
        embeddings: tuple[nn.Embedding, ...],
        head: nn.Linear,
        sink: Callable,
        block_entries: int,
    ):
        self.name, self.embeddings, self.head, self.sink = name, embeddings, head, sink
        self.block_rows = max(MIN_BLOCK_ROWS, block_entries // head.weight.shape[1])
        self.tokens: list[torch.Tensor] = []
        self.streamed_calls = self.plain_calls = 0

    def reset(self) -> None:
        self.tokens, self.streamed_calls, self.plain_calls = [], 0, 0

    def weight_grad(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The output layer's contribution to the table's gradient, (tokens x vocab)^T @ (tokens x width).

        Streamed when the output layer ran once: the rows of the embedding's tokens come back as a row-sparse
        gradient (the embedding adds to exactly those rows); every other row is final already, so the sink
        scores it block by block and no vocab-sized gradient ever exists. Otherwise the dense product.
        """
        tokens, alone = self.tokens, self.streamed_calls == 1 and self.plain_calls == 0
        self.reset()
        if not alone:  # another output pass adds to every row: none is final before the sum
            return g.t().mm(h)
        rows = torch.unique(torch.cat([t.reshape(-1) for t in tokens])) if tokens else g.new_empty(0).long()
        rows = rows.to(g.device)
        height, width = g.shape[1], h.shape[1]
        values = g.new_empty(rows.numel(), width)
        starts = list(range(0, height, self.block_rows))
        if len(starts) > 1 and height - starts[-1] < MIN_BLOCK_ROWS:
            starts.pop()  # a short tail joins the block before it
        bounds = [*starts, height]
        edges = torch.searchsorted(rows, torch.tensor(bounds, device=rows.device)).tolist()
        for i, first in enumerate(starts):
            block = g[:, first : bounds[i + 1]].t().mm(h)  # rows [first, next start) of g^T @ h
            local = rows[edges[i] : edges[i + 1]] - first
            if local.numel():
                values[edges[i] : edges[i + 1]] = block.index_select(0, local)
            self.sink(self.name, first, block, local)
        return torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, (height, width), is_coalesced=True, check_invariants=False
        )


class TiedOutputStreams:
    """Backward never builds the vocab-sized gradient of a table tied between input embedding and output layer.

    Such a table gets two contributions: the output layer's, dense (every vocabulary row), and the input
    embedding's, only in the rows of the batch's tokens. Autograd sums them into one table-sized gradient
    that lives from the first step of backward (the output layer) to the last (the embedding): 108 MiB for
    SmolLM2's 49,152 x 576 table, on top of whatever else backward holds at any moment.

    Here the embedding records its token ids and returns a row-sparse gradient (as `RowSparseEmbeddings`),
    and the output layer's backward computes its weight gradient in blocks of whole rows, about
    `block_entries` entries each. A row outside the token set gets nothing more from the embedding, so its
    block values are final and go to `sink(name, first_row, block, token_rows_in_block)` at once; the token
    rows come back to autograd as a row-sparse gradient, to which the embedding's rows are added, and reach
    `p.grad` as usual. On CPU every value is bitwise the dense path's (the same products, see
    `MIN_BLOCK_ROWS`; a + b summed the same way). Used by the low-memory mode, whose hooks free `p.grad`
    anyway. If the output layer runs more than once before a backward (or under autocast), its gradient is
    dense, as without this class.

    Example:
        >>> emb = nn.Embedding(100, 4); head = nn.Linear(4, 100, bias=False); head.weight = emb.weight
        >>> seen = []
        >>> streams = TiedOutputStreams({"w": ((emb,), head)}, lambda *a: seen.append(a[1]), block_entries=256)
        >>> head(emb(torch.tensor([[3, 3, 7]]))).sum().backward()
        >>> seen, coalesced_rows(emb.weight.grad)[0].tolist()
        ([0, 64], [3, 7])
    """

    def __init__(
        self,
        tables: dict[str, tuple[tuple[nn.Embedding, ...], nn.Linear]],
        sink: Callable,
        block_entries: int,
    ) -> None:
        self.tables = {name: _TiedTable(name, e, h, sink, block_entries) for name, (e, h) in tables.items()}
        self._handles = []
        self._heads = []
        for table in self.tables.values():
            for embedding in table.embeddings:
                hook = self._embedding_hook(table)
                self._handles.append(embedding.register_forward_hook(hook, with_kwargs=True))
            head = table.head
            self._heads.append((head, head.__dict__.get("forward")))
            head.forward = self._head_forward(table, head.forward)  # the class's (or an earlier wrapper's)

    @staticmethod
    def _embedding_hook(table: _TiedTable) -> Callable:
        def hook(module: nn.Embedding, args: tuple, kwargs: dict, output: torch.Tensor):
            return _row_sparse_lookup(module, args, kwargs, on_input=table.tokens.append)

        return hook

    @staticmethod
    def _head_forward(table: _TiedTable, forward: Callable) -> Callable:
        # The output layer's own forward is replaced, not hooked: a forward hook would run after the vocab-sized
        # logits are already computed once.
        def streamed_forward(input: torch.Tensor) -> torch.Tensor:
            weight = table.head.weight
            if not (torch.is_grad_enabled() and weight.requires_grad):
                return forward(input)
            if torch.is_autocast_enabled(input.device.type) or table.head.bias is not None:
                table.plain_calls += 1  # another precision, or a bias: autograd's own dense gradient
                return forward(input)
            table.streamed_calls += 1
            return _StreamedOutput.apply(input, weight, table)

        return streamed_forward

    def reset(self) -> None:
        """Forget forwards that had no backward (the engine calls this every optimizer step)."""
        for table in self.tables.values():
            table.reset()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for head, previous in self._heads:
            if previous is None:
                del head.forward
            else:
                head.forward = previous
        self._handles, self._heads = [], []


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
        return _row_sparse_lookup(module, args, kwargs)

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
