"""Prompt length checked before the tokenizer sees the whole prompt.

Tokenizing a 20 MB prompt only to refuse it took ~1 minute and 3.5 GB. Here a prompt longer than
``CHARS_PER_TOKEN * (limit + MARGIN)`` characters has only that *prefix* tokenized: when the
prefix alone holds more than ``limit + MARGIN`` tokens the prompt is refused (or skipped) at
once. Tokenizing a prefix cut mid-word changes at most the last word's tokens, and a chat
template only adds tokens around the text, so ``MARGIN`` tokens cover both: no prompt that would
fit is refused. A prompt whose prefix has fewer tokens (over ``CHARS_PER_TOKEN`` characters per
token: long unknown words, long repeated runs) goes on to the exact count after rendering, as
before. Only the prompt text (or the message contents) is measured, not the context: a context
reaches the prefixes through the templates, so it is counted after rendering.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from data_schemas.errors import UserError

CHARS_PER_TOKEN = 32  # far above natural text (~4): below it a prompt is tokenized whole
MARGIN = 64  # tokens: a word cut at the prefix's end, special tokens


def row_text(row: dict) -> str:
    """A prompts row's own text: the prompt, or the message contents joined."""
    if row.get("messages"):
        return "\n".join(m.get("content") or "" for m in row["messages"])
    return row.get("prompt") or ""


def surely_too_long(tok: Any, text: str, limit: int) -> int | None:
    """Tokens in the measured prefix when they alone exceed ``limit`` (None: it may fit, or the
    text is short enough to be counted exactly later)."""
    n_chars = CHARS_PER_TOKEN * (limit + MARGIN)
    if len(text) <= n_chars:
        return None
    n = len(tok(text[:n_chars], add_special_tokens=False)["input_ids"])
    return n if n > limit + MARGIN else None


def precheck(
    table: pa.Table, tok: Any, limit: int, too_long: str, where: str
) -> tuple[pa.Table, list[dict]]:
    """(rows that may fit, skipped ``[{id, chars, tokens_in_prefix}]``) for
    ``rollout.too_long=skip``; with ``error`` the first surely-too-long row is one UserError."""
    rows = table.select(["id", "prompt", "messages"]).to_pylist()
    over: list[tuple[int, int, int]] = []  # (row, characters, tokens in the prefix)
    for i, r in enumerate(rows):
        text = row_text(r)
        n = surely_too_long(tok, text, limit)
        if n is None:
            continue
        if too_long != "skip":
            raise UserError(
                f"prompt {r['id']!r} is over the limit of {limit} tokens: its first "
                f"{CHARS_PER_TOKEN * (limit + MARGIN):,} of {len(text):,} characters are already "
                f"{n} tokens (the rest was not tokenized)",
                where,
                "shorten it, raise rollout.max_prompt_tokens (within the model's context length "
                "minus rollout.max_new_tokens), or set rollout.too_long=skip",
            )
        over.append((i, len(text), n))
    if not over:
        return table, []
    drop = {i for i, _, _ in over}
    keep = [i for i in range(len(rows)) if i not in drop]
    skipped = [{"id": rows[i]["id"], "chars": c, "tokens_in_prefix": n} for i, c, n in over]
    return table.take(keep), skipped
