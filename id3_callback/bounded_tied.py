"""Bounded weight gradients for an output layer tied to the input embedding (`weight_grads="bounded"`).

Most causal LMs share one table W (vocab x d) between the input embedding and the output layer; SmolLM2's
49,152 x 576 is its largest tensor (a 108 MiB fp32 gradient). Its gradient has two parts: dW_head = gᵀh over
the output layer's tokens, in every row, and dW_emb, nonzero only in the rows R of the step's input token ids.
Backward reaches the output layer first and the embedding last, so:

- the embedding's forward records its token ids (a forward hook, which also routes the lookup through
  `_TiedLookup`): R is known when the output layer's backward runs;
- the output layer runs `bounded.py`'s kernel as any Linear, with R's entries excluded: outside R the
  gradient is dW_head alone, so the bound and its certification hold unchanged there. R's head rows are one
  GEMM (|R| x d, |R| at most the batch's tokens), kept for later (`on_head_backward`);
- the embedding's backward returns no weight gradient (`p.grad` stays None) and hands its rows over
  (`sparse_grads.embedding_rows`, the dense kernel's sums);
- at `engine.step()`, before selection (`finish`): R's rows = dW_head + dW_emb, exact, scored densely into
  the step's top-k (every entry verified), and the optimizer's gradients at the unmasked entries completed.

Certification: every entry of R is verified; every other entry's gradient is the head's alone, bounded as in
`bounded.py`; so an unverified entry still scores <= bound < τ <= c. R stays excluded when a layer left
uncertified is scored again (`BoundedGrads.certify`). No vocab x d tensor is allocated. If the output layer
ran without the bounded backward in a step (under autocast), the embedding's gradient goes to autograd as a
row-sparse tensor and the table is scored from `p.grad` like any other.

Example (the engine installs it when the plan lists a tied table, `Plan.bounded_tied`):
    >>> tied = TiedOutputRows({"w": (emb,)}, unmasked, offsets, scan.sorted_unmasked)  # doctest: +SKIP
    >>> BoundedGrads(layers, unmasked, offsets, sorted_unmasked, make_scorer, wanted, tied=tied)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .masks import UnmaskedSet
from .sparse_grads import embedding_rows, locate, row_sparse_gradient


@dataclass
class _Table:
    """One tied table within the step in progress."""

    embeddings: tuple[nn.Embedding, ...]
    weight: nn.Parameter
    tokens: list = field(default_factory=list)  # token ids of this step's lookups under grad
    rows: torch.Tensor | None = None  # R, sorted: set by the output layer's bounded backward
    head_rows: torch.Tensor | None = None  # (|R| x d): dW_head's rows R, the embedding's added at `finish`
    in_rows: torch.Tensor | None = None  # for each unmasked entry (in the set's order): its row is in R
    embedding_grads: list = field(default_factory=list)  # (positions in R, rows' values) per lookup


class _TiedLookup(torch.autograd.Function):
    """`F.embedding` whose weight gradient goes to `TiedOutputRows.on_embedding_backward`."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, owner: tuple):
        ctx.save_for_backward(input)
        ctx.shape, ctx.padding_idx, ctx.owner = weight.shape, padding_idx, owner
        return F.embedding(input, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (input,) = ctx.saved_tensors
        tied, name = ctx.owner
        rows, values = embedding_rows(input, grad_out, ctx.padding_idx)
        return None, tied.on_embedding_backward(name, rows, values, ctx.shape), None, None


def tied_output_heads(candidates: Mapping[str, tuple]) -> dict[str, nn.Module]:
    """{table name: its output layer} from `sparse_grads.tied_output_candidates`' result."""
    return {name: head for name, (_, head) in candidates.items()}


class TiedOutputRows:
    """The token rows of tables tied between input embeddings and a bounded output layer (see module doc).

    `tables`: table name -> its nn.Embedding modules; `offsets`: each selectable tensor's global offset;
    `sorted_unmasked(name)`: the set's sorted indices of a tensor (the scan's cached copy).
    """

    def __init__(
        self,
        tables: Mapping[str, tuple[nn.Embedding, ...]],
        unmasked: UnmaskedSet,
        offsets: Mapping[str, int],
        sorted_unmasked: Callable[[str], torch.Tensor],
    ) -> None:
        self.unmasked, self.offsets, self.sorted_unmasked = unmasked, offsets, sorted_unmasked
        self.tables = {
            name: _Table(tuple(embeddings), unmasked.params[name]) for name, embeddings in tables.items()
        }
        self._handles = [
            embedding.register_forward_hook(self._lookup(name), with_kwargs=True)
            for name, table in self.tables.items()
            for embedding in table.embeddings
        ]

    def _lookup(self, name: str) -> Callable:
        def hook(module: nn.Embedding, args: tuple, kwargs: dict, output: torch.Tensor):
            if not (torch.is_grad_enabled() and module.weight.requires_grad):
                return None  # evaluation: the module's own output
            input = args[0] if args else kwargs["input"]
            self.tables[name].tokens.append(input.detach().reshape(-1))
            return _TiedLookup.apply(input, module.weight, module.padding_idx, (self, name))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    def reset(self) -> None:
        """Forget the step (the engine closes every step's pass with it)."""
        for name, table in self.tables.items():
            self.tables[name] = _Table(table.embeddings, table.weight)

    # ------------------------------------------------------------------------------------------ in backward
    def on_head_backward(
        self, name: str, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, excluded: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer's gradient aᵀb (a: tokens x vocab, b: tokens x d): keep its rows R, and return
        what the bounded kernel scores instead of (`idx`, `excluded`): the unmasked entries outside R, and
        the sorted entries to leave out (the unmasked ones and all of R's)."""
        table = self.tables[name]
        width = b.shape[1]
        tokens = [t.to(idx.device) for t in table.tokens]
        rows = torch.unique(torch.cat(tokens)) if tokens else idx.new_empty(0)
        table.rows = rows
        table.head_rows = a.index_select(1, rows).t().mm(b)
        table.in_rows = locate(rows, width, idx)[2]
        entries = (rows[:, None] * width + torch.arange(width, device=rows.device)).view(-1)
        return idx[~table.in_rows], torch.unique(torch.cat([excluded, entries]))

    def on_embedding_backward(
        self, name: str, rows: torch.Tensor, values: torch.Tensor, shape: torch.Size
    ) -> torch.Tensor | None:
        """An embedding lookup's gradient rows: kept for `finish` (None to autograd) when the output layer's
        bounded backward ran this step, else returned to autograd as a row-sparse gradient."""
        table = self.tables[name]
        if table.rows is None:
            return row_sparse_gradient(rows, values, shape)
        pos = torch.searchsorted(table.rows, rows).clamp_(max=max(table.rows.numel() - 1, 0))
        if rows.numel() and (table.rows.numel() == 0 or not bool((table.rows[pos] == rows).all())):
            raise RuntimeError(
                f"weight_grads='bounded': the embedding of {name} looked up tokens after its tied output layer's "
                "backward (a second forward before engine.step()?). Set ID3Config(weight_grads='dense')."
            )
        table.embedding_grads.append((pos, values))
        return None

    # ------------------------------------------------------------------------------------------ at step()
    def finish(self, bp) -> None:
        """R's rows of each table whose output layer ran bounded: dW_head + dW_emb, scored into the pass `bp`
        (a `bounded._Pass`) when it selects anything, and the unmasked entries' gradients completed."""
        for name, table in self.tables.items():
            block = table.head_rows
            if block is None:
                continue
            table.head_rows = None  # scored once
            for pos, values in table.embedding_grads:
                block.index_add_(0, pos, values)
            table.embedding_grads = []
            p, rows, in_rows = table.weight, table.rows, table.in_rows
            width = block.shape[1]
            idx = self.unmasked.indices[name]
            if bp.k > 0:
                excluded = self.sorted_unmasked(name)
                bp.scorer.push_row_block(bp.top, block, p, self.offsets[name], rows, excluded)
                inside = rows.numel() * width - int(in_rows.sum())
                bp.verified += inside
                bp.masked += inside
            stash = block.new_empty(idx.numel())
            outside = self.unmasked.grad_stash.get(name)  # the bounded kernel's, for the entries outside R
            stash[~in_rows] = outside.to(stash.dtype) if outside is not None else 0.0
            pos, col, _ = locate(rows, width, idx[in_rows])
            stash[in_rows] = block[pos, col]
            self.unmasked.grad_stash[name] = stash.to(p.dtype)
