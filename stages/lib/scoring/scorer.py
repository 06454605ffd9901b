"""The shard scorer: runs a plan's passes on the chosen backend (HF, or vLLM plus an HF pass for
what vLLM cannot give). HF models: one loaded at a time (``score.resident=one``, the default on
CUDA: the peak is the largest model, not the sum of the teacher, behaviour and reference models),
or all kept loaded for the run (``all``, the default on CPU)."""

from __future__ import annotations

import gc

import torch

from stages.lib import models
from stages.lib.config import Config
from stages.lib.errors import UserError
from stages.lib.scoring.hf import HFModel, hf_model, hf_score
from stages.lib.scoring.plan import Pass, PassKey, Role


class Scorer:
    """Loads each distinct model once (per backend) and runs jobs through it."""

    def __init__(
        self,
        cfg: Config,
        backend: str,
        vocab_size: int,
        pad_id: int,
        max_len: int,
        devices: dict[str, torch.device],
    ):
        self.cfg, self.backend, self.vocab, self.pad_id = cfg, backend, vocab_size, pad_id
        self.max_len = max_len
        self.hf: dict[tuple, HFModel] = {}
        self.llms: dict[tuple, object] = {}
        self.devices = devices  # role name -> where its HF model runs (role_devices)
        self.one_teacher = bool(cfg.teachers)  # several teachers: one resident at a time
        self.teacher_keys: set[tuple] = set()
        # HF: one model loaded at a time (auto: where weights live in GPU memory; on CPU the fp32
        # weights are mmapped file pages and reloading them lowered no peak: docs/BENCHMARKS.md)
        on_gpu = any(d.type == "cuda" for d in devices.values())
        self.one_model = cfg.score.resident == "one" or (cfg.score.resident == "auto" and on_gpu)

    def _evict_others(self, key: tuple) -> None:
        """``score.resident=one``: drop every loaded HF model but ``key`` before ``key`` loads,
        and hand their memory back (the next model's peak is then its own size)."""
        stale = [k for k in self.hf if k != key]
        if not (self.one_model and stale):
            return
        for k in stale:
            self.hf.pop(k)
        gc.collect()  # a model's modules reference each other: free them now, not later
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _evict_teachers(self, role: Role) -> None:
        """Before loading teacher ``role``: drop the other teachers' models (several teachers)."""
        if not (self.one_teacher and role.name == "teacher"):
            return
        stale = self.teacher_keys - {role.model_key}
        for key in [k for k in self.hf if k[:-1] in stale]:  # HF keys end with the device
            self.hf.pop(key)
        for key in stale:
            self.llms.pop(key, None)
        self.teacher_keys = {role.model_key}

    def hf_model(self, role: Role) -> HFModel:
        self._evict_teachers(role)
        device = self.devices[role.name]
        key = (*role.model_key, str(device))
        self._evict_others(key)
        if key not in self.hf:
            model = models.load_model(role.path, role.name, dtype=role.dtype, device=device)
            rows = model.get_output_embeddings().weight.shape[0]
            if rows < self.vocab:
                raise UserError(
                    f"the {role.name} model has {rows} output rows but the tokenizer has "
                    f"{self.vocab} ids",
                    f"{role.name} model {role.path}",
                    "use the model that matches the tokenizer",
                )
            ctx = models.context_length(model)
            if self.max_len > ctx:
                raise UserError(
                    f"a rollout has {self.max_len} prefix + response tokens, more than the "
                    f"{role.name} model's context length {ctx}",
                    f"{role.name}.path={role.path}",
                    "use a model with a longer context or shorter rollouts",
                )
            self.hf[key] = hf_model(model, device, self.cfg.score.compile)
        return self.hf[key]

    def run(
        self, jobs: list[Pass], done: dict[PassKey, Pass], *, stats: bool, gather: bool, progress
    ) -> None:
        sc = self.cfg.score
        by_model: dict[tuple, list[Pass]] = {}
        for j in jobs:
            by_model.setdefault(j.role.model_key, []).append(j)

        def run_hf(role, jobs, with_stats, bar):  # the HF pass (all of it, or vLLM's extras)
            hf_score(
                self.hf_model(role),
                jobs,
                vocab_size=self.vocab,
                batch_tokens=sc.batch_tokens,
                chunk=sc.chunk_positions,
                pad_id=self.pad_id,
                done=done,
                behavior_topk=sc.behavior_topk,
                stats=with_stats,
                gather=gather,
                progress=bar,
                share_prefix=sc.share_prefix,
                split=sc.split_attention,
            )

        for group in by_model.values():
            role = group[0].role
            need_hf_extra = any(j.entropy or (gather and j.gathers) for j in group)
            if self.backend == "vllm" and stats:
                self._vllm(role, group)
                if progress is not None:
                    progress.update(sum(len(j.response) for j in group))
                if not need_hf_extra:
                    continue
                extra = [j for j in group if j.entropy or (gather and j.gathers)]
                saved = {id(j): j.result for j in extra}
                run_hf(role, extra, any(j.entropy for j in extra), None)
                for j in extra:  # keep vLLM's log-probs, take HF's entropy
                    hf_res, j.result = j.result, saved[id(j)]
                    if j.entropy and hf_res is not None:
                        j.result["entropy"] = hf_res["entropy"]
                continue
            run_hf(role, group, stats, progress)

    def _vllm(self, role: Role, group: list[Pass]) -> None:
        from stages.lib import vllm_backend as vb

        k = max(1, max(j.k for j in group))
        kmax = max(1, self.cfg.score.topk, self.cfg.score.behavior_topk)
        self._evict_teachers(role)
        if role.model_key not in self.llms:
            self.llms[role.model_key] = vb.get_llm(
                role.path,
                seed=self.cfg.seed,
                max_model_len=self.max_len + 1,
                max_logprobs=kmax,
                dtype=role.dtype,
                tensor_parallel_size=self.cfg.score.tensor_parallel_size,
            )
        out = vb.score(
            self.llms[role.model_key], [j.prefix for j in group], [j.response for j in group], k=k
        )
        for j, res in zip(group, out, strict=True):
            j.result = res


def role_devices(sc) -> dict[str, torch.device]:
    """score.device / teacher_device / ref_device as torch devices (null = score.device); a
    UserError, before anything is read or written, when one names a GPU that is not there."""
    return {
        "behavior": models.pick_device(sc.device, "score.device"),
        "teacher": models.pick_device(sc.teacher_device or sc.device, "score.teacher_device"),
        "ref": models.pick_device(sc.ref_device or sc.device, "score.ref_device"),
    }
