"""Checks of a model folder's JSON files before transformers reads it (stages.lib.models).

A model folder may come from anywhere. transformers is always called without
``trust_remote_code``, so code in a folder never runs; but a folder that asks for custom code
(``auto_map`` with an architecture transformers does not ship) makes transformers *prompt* on a
terminal whether to run it, and a tokenizer may claim ids far past the model's embedding rows
(loading one that claims id 2e9 took 7.9 GB; decoding it crashes). Both are refused here, from
the JSON alone, with one line naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_schemas.errors import UserError


def _json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None (missing or unreadable: transformers reports it)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _builtin_model_type(model_type: object) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def _builtin_tokenizer(cls: object) -> bool:
    import transformers

    if not isinstance(cls, str) or not cls:
        return True  # no class named: transformers picks one from the model type
    return hasattr(transformers, cls) or hasattr(transformers, cls.removesuffix("Fast"))


def check_no_custom_code(p: Path, role: str) -> None:
    """Refuse a folder that can only load by running its own code (``auto_map``)."""
    cfg = _json(p / "config.json") or {}
    if "auto_map" in cfg and not _builtin_model_type(cfg.get("model_type")):
        raise UserError(
            f"the {role} model asks for custom code (config.json auto_map, model_type "
            f"{cfg.get('model_type')!r} is not built into transformers); distillery never runs "
            "code from a model folder",
            str(p / "config.json"),
            "use a model whose architecture transformers ships (or convert it to one)",
        )
    tcfg = _json(p / "tokenizer_config.json") or {}
    if "auto_map" in tcfg and not _builtin_tokenizer(tcfg.get("tokenizer_class")):
        raise UserError(
            f"the {role} tokenizer asks for custom code (tokenizer_config.json auto_map, class "
            f"{tcfg.get('tokenizer_class')!r}); distillery never runs code from a model folder",
            str(p / "tokenizer_config.json"),
            "save the tokenizer with a class transformers ships (tokenizer.json + a built-in class)",
        )


def embedding_rows(p: Path) -> int | None:
    """``vocab_size`` of config.json (or of its ``text_config``), or None."""
    cfg = _json(p / "config.json") or {}
    for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        v = c.get("vocab_size")
        if isinstance(v, int) and v > 0:
            return v
    return None


def tokenizer_max_id(p: Path) -> tuple[int, str] | None:
    """(the largest token id the tokenizer files declare, the file), or None when they declare
    none: tokenizer.json's vocabulary and added tokens, tokenizer_config.json's
    added_tokens_decoder, a slow tokenizer's vocab.json / added_tokens.json."""
    found: list[tuple[int, str]] = []

    def add(ids, name: str) -> None:
        ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
        if ids:
            found.append((max(ids), name))

    tj = _json(p / "tokenizer.json") or {}
    vocab = (tj.get("model") or {}).get("vocab") if isinstance(tj.get("model"), dict) else None
    if isinstance(vocab, dict):
        add(vocab.values(), "tokenizer.json")
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the index
        add([len(vocab) - 1], "tokenizer.json")
    if isinstance(tj.get("added_tokens"), list):
        add([t.get("id") for t in tj["added_tokens"] if isinstance(t, dict)], "tokenizer.json")
    dec = (_json(p / "tokenizer_config.json") or {}).get("added_tokens_decoder")
    if isinstance(dec, dict):
        add([int(k) for k in dec if str(k).lstrip("-").isdigit()], "tokenizer_config.json")
    for name in ("vocab.json", "added_tokens.json"):
        doc = _json(p / name)
        if doc:
            add(list(doc.values()), name)
    return max(found) if found else None


def check_tokenizer_ids(p: Path, role: str) -> None:
    """Every id the tokenizer declares has an embedding row (checked before it is loaded)."""
    rows, top = embedding_rows(p), tokenizer_max_id(p)
    if rows is None or top is None or top[0] < rows:
        return
    raise UserError(
        f"the {role} tokenizer declares token id {top[0]} but the model has {rows} embedding rows "
        "(config.json vocab_size): such a token cannot be scored or decoded",
        str(p / top[1]),
        "use the tokenizer saved with this model (ids must be < vocab_size)",
    )
