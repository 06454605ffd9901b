"""LoRA adapters (through peft), loaded one way for every stage.

The trainer creates an adapter (``train.lora.r > 0``) or re-attaches a step checkpoint's adapter to
the init weights on resume; evaluation applies an adapter-only checkpoint
(``train.lora.save_merged=false``) to its base and merges it. peft is optional (the dev extra): a
stage that needs it without it installed ends with one error line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.lib import models, safety
from stages.lib.errors import UserError


def _peft(what: str, where: str) -> Any:
    try:
        import peft
    except ImportError:
        raise UserError(
            f"{what} needs peft, which is not installed",
            where,
            "pip install peft (or train with train.lora.r=0 / train.lora.save_merged=true)",
        ) from None
    return peft


def is_adapter_dir(path: str | Path) -> bool:
    """An adapter-only checkpoint (train.lora.save_merged=false): adapter files, no config.json."""
    p = Path(path)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def adapter_base(path: str | Path, fallback: str) -> str:
    """The model an adapter was trained on: its adapter_config's base when that directory exists
    (relative paths as the trainer wrote them), else ``fallback`` (the student)."""
    f = Path(path) / "adapter_config.json"
    fix = "re-save the adapter (model.save_pretrained(DIR)) or evaluate a merged checkpoint"
    base = safety.parse_json_object(f.read_bytes(), "adapter_config.json", str(f), fix).get(
        "base_model_name_or_path"
    )
    return base if base and (Path(base) / "config.json").is_file() else fallback


def new_adapter(model: Any, lc: Any) -> Any:
    """``model`` with a fresh LoRA adapter of ``train.lora`` (``lc``), only the adapter trainable."""
    peft = _peft("train.lora.r > 0", "train.lora.r")
    cfg = peft.LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, cfg)


def attach(model: Any, path: str | Path, *, trainable: bool, what: str) -> Any:
    """``model`` with the adapter saved in ``path`` (a resumed step checkpoint: ``trainable``);
    adapters load from safetensors only, as weights do."""
    peft = _peft(what, str(path))
    models.check_safe_weights(Path(path), what, allow_pickle=False)
    return peft.PeftModel.from_pretrained(model, path, is_trainable=trainable)


def merged(model: Any, path: str | Path, what: str) -> Any:
    """``model`` with the adapter of ``path`` folded in: a plain model, in eval mode."""
    return attach(model, path, trainable=False, what=what).merge_and_unload().eval()
