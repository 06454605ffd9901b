"""The online (live-teacher) OPD baseline: the teacher scores every micro-batch inside the loop."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from data_schemas import manifest as manifest_mod
from data_schemas import rollouts as rollouts_table
from stages.lib import models, store
from stages.lib.config import Config
from stages.lib.layout import RunLayout
from stages.lib.loader import MicroBatch
from stages.lib.logprobs import sequence_stats
from stages.lib.training.job import Job
from stages.lib.training.objective import loss_chunk


# ============================================================================ setup: online teacher
def teacher_prefixes(layout: RunLayout) -> dict[str, list[int]] | None:
    """sample_id -> teacher_prompt_ids from the rollouts table (online mode), None if absent."""
    if manifest_mod.read(layout.rollouts) is None:
        return None
    t = store.read_table(
        layout.rollouts, rollouts_table, columns=["sample_id", "teacher_prompt_ids"]
    )
    return dict(zip(t["sample_id"].to_pylist(), t["teacher_prompt_ids"].to_pylist()))


def online_teacher(
    teacher: nn.Module, mb: MicroBatch, prefixes, k: int, vocab: int, cfg: Config, pad_id: int
) -> None:
    """Replace the cached teacher columns of ``mb`` with a live teacher pass (standard OPD).

    What a live-teacher trainer does per micro-batch: a teacher forward under ``inference_mode``,
    full-vocabulary fp32 log-softmax, top-K gather (``sequence_stats``, as the score stage does).
    """
    pre = [prefixes.get(s, p) if prefixes else p for s, p in zip(mb.sample_ids, mb.prefix_ids)]
    with torch.inference_mode():
        stats = sequence_stats(
            teacher, pre, mb.response_ids, k, vocab, cfg.loss.temperature,
            loss_chunk(cfg.train, vocab), pad_id, want_entropy=False,
        )  # fmt: skip
    # Built outside inference mode: the loss may save these tensors for backward.
    dev = mb.batch["token_id"].device
    cat = lambda key: torch.from_numpy(np.concatenate([s[key] for s in stats])).to(dev)  # noqa: E731
    mb.batch["teacher_logprob"] = cat("logprob")  # [M]
    mb.batch["teacher_topk_ids"] = cat("topk_ids").long()  # [M, K]
    mb.batch["teacher_topk_logprobs"] = cat("topk_logprobs")  # [M, K]
    mb.batch["teacher_topk_logmass"] = cat("topk_logmass")  # [M]


def online_scorer(job: Job) -> Callable[[MicroBatch], None] | None:
    """``train.online``: a live teacher replacing the cached columns of each micro-batch."""
    cfg = job.cfg
    if not cfg.train.online:
        return None
    teacher = models.load_model(
        cfg.teacher.path, "teacher", dtype="float32", device=job.dist.device,
        allow_pickle=cfg.train.allow_pickled_weights,
    )  # fmt: skip
    t_tok = models.tokenizer_fingerprint(models.load_tokenizer(cfg.teacher.path, "teacher"))
    models.check_same_tokenizer(job.identity["tokenizer"], t_tok, "student", "teacher")
    prefixes = teacher_prefixes(job.layout)

    def score(mb: MicroBatch) -> None:  # the cached K, so the loss sees the same support size
        k = mb.batch["teacher_topk_ids"].shape[1]
        online_teacher(teacher, mb, prefixes, k, job.vocab, cfg, job.pad_id)

    return score
