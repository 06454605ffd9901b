"""Loading models and tokenizers with clear errors, and the fingerprints provenance checks use.

A *model fingerprint* hashes the config and the weight files; a *tokenizer fingerprint* hashes the
vocabulary (token -> id) and the special tokens. Stages store both in manifests and refuse to mix
data from different tokenizers or a teacher other than the one expected. We compare tokenizers,
never ``config.vocab_size``: many families pad the embedding matrix past the tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from stages.lib import model_checks
from stages.lib.errors import UserError, fault_point

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
FULL_HASH_LIMIT = 1 << 30  # hash weight files fully up to 1 GiB; larger: size + head + tail


def _check_dir(path: str | None, role: str) -> Path:
    if not path:
        raise UserError(f"no {role} model configured", f"{role}.path", f"set {role}.path=DIR")
    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"{role} model directory not found: {path}",
            f"{role}.path",
            "point it at a local Hugging Face model directory (save_pretrained format); the demo "
            "builds its models with `python scripts/make_demo.py`",
        )
    if not (p / "config.json").exists():
        raise UserError(
            f"{path} has no config.json: not a Hugging Face model directory",
            f"{role}.path",
            "save the model with save_pretrained()",
        )
    model_checks.check_no_custom_code(p, role)  # never a prompt to run a folder's code
    return p


def load_tokenizer(path: str | None, role: str = "student"):
    from transformers import AutoTokenizer

    p = _check_dir(path, role)
    model_checks.check_tokenizer_ids(p, role)  # before loading: a huge id costs GBs
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the {role} tokenizer ({str(e).splitlines()[0]})",
            str(p),
            "save the tokenizer next to the weights (tokenizer.save_pretrained(DIR))",
        ) from None
    if tok.eos_token_id is None:
        raise UserError(f"the {role} tokenizer has no EOS token", str(p), "set tokenizer.eos_token")
    if not any((p / f).is_file() for f in TOKENIZER_FILES) or len(tok) <= len(
        set(tok.all_special_ids)
    ):  # transformers builds an empty tokenizer from config.json's model type alone
        raise UserError(
            f"the {role} folder has no usable tokenizer (no tokenizer.json or vocabulary file; "
            f"{len(tok)} ids)",
            str(p),
            "save the tokenizer next to the weights (tokenizer.save_pretrained(DIR))",
        )
    return tok


# the files a saved tokenizer consists of (one is enough: tokenizer.json, or the vocabulary files)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model",
)  # fmt: skip


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safe_weights(p: Path, role: str, allow_pickle: bool) -> None:
    """Weights load from safetensors only: a pickle (``pytorch_model.bin``) can run code on load.

    ``allow_pickle`` (``train.allow_pickled_weights``) lets transformers read ``.bin`` files
    (it then uses ``torch.load(weights_only=True)``).
    """
    if allow_pickle or any(p.glob("*.safetensors")):
        return
    pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise UserError(
            f"the {role} model's weights are pickled ({', '.join(pickled[:3])}), which "
            "distillery does not load by default (a pickle can run code)",
            str(p),
            "convert them to safetensors (load once in a session you trust, then "
            "model.save_pretrained(DIR)); the trainer also accepts a file you trust with "
            "train.allow_pickled_weights=true",
        )


def load_model(
    path: str | None,
    role: str = "student",
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
):
    """A causal LM in eval mode on ``device``; a UserError when it is not one.

    Only safetensors weights load unless ``allow_pickle`` (see ``check_safe_weights``).
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    p = _check_dir(path, role)
    check_safe_weights(p, role, allow_pickle)
    fault_point("model_load")
    try:
        config = AutoConfig.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=getattr(torch, dtype), use_safetensors=None if allow_pickle else True
        )
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # corrupt weights too
        raise UserError(
            f"{p} is not a causal LM that transformers can load ({str(e).splitlines()[0][:200]})",
            f"{role}.path",
            "use a directory saved by a *ForCausalLM model",
        ) from None
    del config
    return model.to(device).eval()


def vocab_size(tok) -> int:
    """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
    return len(tok)


def tokenizer_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    blob = json.dumps([vocab, special], separators=(",", ":"))
    return "tok-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        else:  # very large shards: size + first and last 16 MiB (cheap, still catches swaps)
            h.update(str(size).encode())
            h.update(f.read(1 << 24))
            f.seek(size - (1 << 24))
            h.update(f.read(1 << 24))
    return h.hexdigest()


def model_fingerprint(path: str | None, role: str = "model") -> str:
    """Hash of config.json and the weight files of a model directory."""
    p = _check_dir(path, role)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in sorted(p.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES and f.is_file():
            st = f.stat()
            h.update(f.name.encode())
            h.update(_file_digest(str(f), st.st_size, st.st_mtime_ns).encode())
    return "model-" + h.hexdigest()[:16]


def check_same_tokenizer(fp_a: str, fp_b: str, a: str, b: str) -> None:
    if fp_a != fp_b:
        raise UserError(
            f"the {a} and {b} tokenizers differ ({fp_a} vs {fp_b}); token ids would not mean the "
            "same thing",
            f"{a}.path / {b}.path",
            "use models that share one tokenizer (cross-tokenizer distillation is not supported)",
        )


def check_embedding_rows(model, tok, role: str) -> None:
    """The model must have a row for every id the tokenizer can produce (padding is fine)."""
    rows = model.get_output_embeddings().weight.shape[0]
    top = max(tok.get_vocab().values(), default=-1)  # ids may skip numbers: len() is not enough
    if rows < vocab_size(tok) or top >= rows:
        raise UserError(
            f"the {role} model has {rows} output rows but its tokenizer has {vocab_size(tok)} ids "
            f"(largest {top})",
            f"{role}.path",
            "use the matching tokenizer",
        )


def pick_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """``auto`` = cuda when present, else cpu; ``cuda`` / ``cuda:N`` must exist (a UserError naming
    the config ``key`` otherwise, raised before any model is loaded)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(
                f"{key}={name} but CUDA is not available", key, f"use {key}=auto or {key}=cpu"
            )
        if device.index is not None and device.index >= n:
            raise UserError(
                f"{key}={name} but only {n} CUDA device(s) exist", key, f"use cuda:0..cuda:{n - 1}"
            )
    return device


def context_length(model) -> int:
    c = model.config
    return int(
        getattr(c, "max_position_embeddings", None) or os.environ.get("DISTILLERY_CTX", 2048)
    )


def compiled_body(model, where: str = "score.compile"):
    """The decoder body of ``model`` compiled by TorchInductor for scoring, or a UserError.

    ``dynamic=True``: one graph serves every batch shape (sizes 0 and 1 are specialised, so a
    one-row batch compiles once more). ``freezing``: the weights become constants of the graph,
    so inductor pre-packs every linear layer's weight for oneDNN (one more copy of the body's
    weights resident) and fuses the norms, rotary, activation and residual adds around the
    GEMMs. Frozen weights: the model must not change afterwards (a teacher does not), and it must
    be called without autograd (``torch.inference_mode``), as the score stage calls it. The first
    call per shape class compiles (seconds to minutes; docs/BENCHMARKS.md, score).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise UserError(
            f"{type(model).__name__} has no separate decoder body to compile",
            where,
            f"set {where}=false",
        )
    device = next(model.parameters()).device
    if device.type == "cpu" and not any(
        shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")
    ):
        raise UserError(
            "no C++ compiler found (TorchInductor compiles CPU kernels with g++ or clang++)",
            where,
            f"install g++ (or set CXX), or set {where}=false",
        )
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError(
                "triton is not installed (TorchInductor needs it for CUDA)",
                where,
                f"pip install triton, or set {where}=false",
            )
    import torch._inductor.config as inductor_config

    compiled = torch.compile(decoder, dynamic=True)

    def body(**kwargs):
        # compiles happen lazily, at a call: freezing must be on then (torch.compile's
        # ``options={"freezing": True}`` is not honoured, the GEMMs stay aten::mm), and only then
        with inductor_config.patch(freezing=True):
            return compiled(**kwargs)

    return body
