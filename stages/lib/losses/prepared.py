"""The loss's inputs, computed once per call: the student's log-probs at the id columns the losses
read (and its log-mass outside chosen sets), and the per-token batch with excluded rows zeroed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from stages.lib.losses.fused import _FusedLogProbs, _in_set, _student_topk

# Id columns whose student log-probs the fused path gathers in its one pass (any present);
# ``student_topk_ids`` is the student's own top-k (``uld``), found before the log-softmax.
GATHER_COLUMNS = (
    "token_id",
    "teacher_topk_ids",
    "behavior_topk_ids",
    "teacher_mapped_ids",
    "student_topk_ids",
)
# Loss -> the id column whose complement's student log-mass it reads (the tail bucket).
TAIL_SETS = {
    "topk_fkl": "teacher_topk_ids",
    "tropd": "teacher_topk_ids",
    "mapped_topk_fkl": "teacher_mapped_ids",
}


def _id_columns(batch: Mapping[str, Tensor]) -> tuple[list[str], Tensor | None]:
    """The gathered id columns present and their concatenation [N, K_all] (ids < 0 -> 0)."""
    names = [c for c in GATHER_COLUMNS if isinstance(batch.get(c), Tensor)]
    parts = [batch[c].long().reshape(batch[c].shape[0], -1) for c in names]  # [N, K_c]
    return names, (torch.cat(parts, dim=1).clamp(min=0) if parts else None)


@dataclass
class Prepared:
    """The student's log-probs and the cleaned per-token batch, computed once per call.

    ``combined_loss`` builds one and passes it as ``logits`` to every term, so the [N, V]
    log-softmax is computed once per call however many terms there are. The losses read the
    student only through the gathered columns (``at``) and the tails (``tail``): no [N, V] tensor
    is handed out (the fused path's one block becomes the gradient in backward).
    """

    vocab_size: int  # real vocabulary columns (the rest are padding)
    token_logp: Tensor  # [N] log π_θ(y_t), with grad
    batch: dict[str, Tensor]  # per-token fields, excluded rows zeroed, floats in fp32
    w: Tensor  # [N] fp32 selection weight
    cols: dict[str, Tensor]  # id column -> student log-probs there [N, K], with grad
    tails: dict[str, tuple[Tensor, Tensor]]  # id column -> (log-mass outside [N], has_tail [N])

    def at(self, name: str) -> Tensor:
        """Student full-vocabulary log-probs at the ids of column ``name`` -> [N, K]."""
        if name not in self.cols:
            raise KeyError(f"batch has no {name!r} column")
        return self.cols[name]

    def tail(self, name: str) -> tuple[Tensor, Tensor]:
        """(log Σ p_θ outside the valid ids of column ``name`` [N], 0 where none; has_tail [N])."""
        if name not in self.tails:
            raise KeyError(f"the tail outside {name!r} was not prepared (see TAIL_SETS)")
        return self.tails[name]

    def need(self, name: str, why: str) -> Tensor:
        if name not in self.batch:
            raise KeyError(f"batch has no {name!r} column, needed by {why}")
        return self.batch[name]


def _clean(batch: Mapping[str, Tensor], n: int, w: Tensor) -> dict[str, Tensor]:
    """Per-token fields with excluded rows (w = 0) zeroed before any arithmetic."""
    keep = w != 0  # [N]
    clean: dict[str, Tensor] = {}
    for name, x in batch.items():
        if not isinstance(x, Tensor) or x.ndim == 0:
            continue
        if x.shape[0] != n:
            raise ValueError(f"batch[{name!r}] has {x.shape[0]} rows, logits have {n}")
        k = keep.view(-1, *([1] * (x.ndim - 1)))  # [N, 1...] broadcast over the K axis
        if x.is_floating_point():
            clean[name] = torch.where(k, x.float(), 0.0)
        elif name.endswith("_ids") or name == "token_id":
            clean[name] = torch.where(k, x.long(), 0)  # id -1 padding must still gather
        else:
            clean[name] = x
    if "token_id" not in clean:
        raise KeyError("batch has no 'token_id' column")
    return clean


def _valid(ids: Tensor) -> Tensor:
    """Which ids [N, K] are members of their set: -1 (a teacher token without a student id in
    ``teacher_mapped_ids``) is not."""
    return ids >= 0


def prepare(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    vocab_size: int | None = None,
    temperature: float = 1.0,
    *,
    tails: tuple[str, ...] = (),
    topk: int = 0,
    dense: bool = False,
    inplace: bool = False,
) -> Prepared:
    """Student log-softmax (fp32, full unpadded vocabulary, at ``temperature``) + cleaned batch.

    ``tails``: id columns whose complement's log-mass to prepare (``TAIL_SETS``). ``topk``: also
    gather the student's ``topk`` most probable tokens (column ``student_topk_ids``, in decreasing
    order). ``inplace``: the fused path may overwrite fp32 ``logits`` with the log-softmax and,
    in backward, with its gradient (the trainer's own head output: no second block).
    ``dense``: plain autograd through an [N, V] ``torch.log_softmax`` instead of the fused path:
    the reference the fused path is tested against (several blocks of memory; no loss uses it).
    """
    if isinstance(logits, Prepared):
        return logits
    n, width = logits.shape
    vocab_size = width if vocab_size is None else vocab_size
    if vocab_size > width:
        raise ValueError(f"vocab_size={vocab_size} exceeds the logits' {width} columns")
    w = batch.get("weight")
    w = torch.ones(n, device=logits.device) if w is None else w.float()  # [N]
    clean = _clean(batch, n, w)
    if topk:
        clean["student_topk_ids"] = _student_topk(logits.detach(), topk, vocab_size)  # [N, k]
    names, ids = _id_columns(clean)  # [N, K_all]
    span, lo = {}, 0  # column -> its [lo, hi) range in ids
    for c in names:
        span[c] = (lo, lo + clean[c].reshape(n, -1).shape[1])
        lo = span[c][1]
    wanted = [c for c in dict.fromkeys(tails) if c in span]
    valids = {c: _valid(clean[c]) for c in wanted}
    if dense:
        z = logits.float()  # [N, V]
        if temperature != 1.0:
            z = z / temperature
        if width > vocab_size:  # out of place: keeps autograd happy
            z = z.masked_fill(torch.arange(width, device=z.device) >= vocab_size, float("-inf"))
        logp = torch.log_softmax(z, dim=-1)  # [N, V]
        vals = logp.gather(1, ids)  # [N, K_all]
        got = {}
        for c in wanted:
            lo, hi = span[c]
            in_set = _in_set(ids[:, lo:hi], valids[c], width)  # [N, V]
            has = (~in_set & torch.isfinite(logp)).any(dim=-1)  # [N]
            # S columns get a finite floor, not -inf: K = V stays finite, gradient included
            floor = torch.finfo(logp.dtype).min
            got[c] = torch.logsumexp(logp.masked_fill(in_set, floor), dim=-1)  # [N]
            got[c] = (torch.where(has, got[c], 0.0), has)
    else:
        sets = [(*span[c], valids[c]) for c in wanted]
        vals, *lses = _FusedLogProbs.apply(logits, ids, sets, temperature, vocab_size, inplace)
        got = {}
        for c, lse in zip(wanted, lses, strict=True):
            has = torch.isfinite(lse)  # [N]
            got[c] = (torch.where(has, lse, 0.0), has)
    cols = {}
    for c in names:
        lo, hi = span[c]
        cols[c] = vals[:, lo:hi].reshape(clean[c].shape)  # [N] or [N, K]
    return Prepared(vocab_size, cols["token_id"], clean, w, cols, got)
