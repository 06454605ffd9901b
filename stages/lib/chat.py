"""Prompt rendering, in one place: a prompts row -> the token ids of the prefixes the stages use.

Used by the rollout (and SFT) stage for ``train_prompt_ids`` / ``rollout_prompt_ids`` /
``teacher_prompt_ids`` and by the eval stage, so every stage sees the same prefixes.

- **Chat rows** (``messages``) are rendered with the tokenizer's chat template (or the template
  file ``rollout.chat_template``), ``add_generation_prompt=True``, then tokenized once with
  ``add_special_tokens=False``: the template writes any BOS itself, so none is added twice. The
  ids equal ``tok.apply_chat_template(messages, add_generation_prompt=True)``.
- The privileged **context** goes into the teacher (and guided rollout) prefix only: appended to
  the system message or placed before the last user message, worded by
  ``rollout.context_template``. The student's training prefix never holds it. A conversation
  without a system message gets one holding the template's **default system prompt** (what the
  template writes when there is none, e.g. ChatML's "You are a helpful assistant.") plus the
  context, so the teacher's prefix differs from the student's by the context alone; a template
  **without a system role** (Gemma's raises on one) gets the context in the user turn instead.
- **Plain rows** (``prompt``) keep the ``str.format`` templates (``rollout.prompt_template`` ...)
  and the tokenizer's own special tokens; a text that already starts with the BOS token does not
  get a second one.
- **Multi-turn**: a conversation with earlier assistant turns is continued after its last message,
  or, with ``rollout.expand_turns``, expanded into one sample per assistant turn, each with its own
  reference answer (the conversation's reply for that turn; the row's ``answer`` for the last).
- **Prefills**: a conversation ending with an assistant message is continued from inside that
  message (``continue_final_message``; ``rollout.final_assistant=regenerate`` writes the turn
  anew instead).
- **Compatibility**: tokenizers are compared by their id -> token maps; EOS/pad/BOS settings may
  differ (they change no id) and are recorded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.lib.config import RolloutConfig
from stages.lib.errors import UserError
from stages.lib.progress import log


@dataclass(frozen=True)
class Turn:
    """One generation point of a prompts row: the messages before it and its turn index."""

    prompt_id: str  # the row id, with "@t<k>" appended when a conversation was expanded
    messages: list[dict[str, str]] | None  # None for a plain prompt row
    turn: int  # index of the generated assistant turn in the conversation (0 = first)
    answer: str | None = None  # this turn's reference answer
    prefill: bool = False  # messages end with an assistant message the student continues


# ----------------------------------------------------------------------------- templating
def load_template(path: str | None) -> str | None:
    """The chat template file's text (``rollout.chat_template``), or None for the tokenizer's."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"chat template file not found: {path}",
            "rollout.chat_template",
            "point it at a Jinja chat template file, or null for the tokenizer's own",
        )
    return p.read_text(encoding="utf-8")


def render_text(
    tok: Any, messages: list[dict], template: str | None, kwargs: dict, prefill: bool = False
) -> str:
    """The chat template applied with a generation prompt (the text the model continues), or,
    for a ``prefill``, up to the end of the final assistant message (continue_final_message)."""
    if template is None and not getattr(tok, "chat_template", None):
        raise UserError(
            f"chat rows need a chat template, and the tokenizer of {tok.name_or_path} has none",
            "rollout.chat_template",
            "use a chat model's tokenizer, set rollout.chat_template=FILE, or give plain 'prompt' rows",
        )
    try:
        return _apply(tok, messages, template, kwargs, prefill)
    except Exception as e:  # noqa: BLE001 - Jinja raises TemplateError/TypeError/... for bad input
        if (
            messages
            and messages[0]["role"] == "system"
            and not supports_system(tok, template, kwargs)
        ):
            raise UserError(
                "the chat template has no system role (it fails on a system message) and a "
                "conversation starts with one",
                "data.prompts / rollout.chat_template",
                "drop the system message or fold it into the first user message, or give a "
                "template that accepts one (rollout.chat_template=FILE)",
            ) from None
        raise UserError(
            f"the chat template failed on a conversation ({type(e).__name__}: {str(e)[:160]})",
            "rollout.chat_template / rollout.template_kwargs",
            "check the template and its keyword arguments against the messages",
        ) from None


def _apply(tok: Any, messages: list[dict], template: str | None, kwargs: dict, prefill: bool):
    return tok.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        chat_template=template,
        **kwargs,
    )


_PROBE = [{"role": "user", "content": "hello"}]
_MARK = "CONTEXT-MARK-5e1f"  # stands in for a system message's text while probing a template


def supports_system(tok: Any, template: str | None, kwargs: dict) -> bool:
    """Does the template accept a system message (Gemma's raises on one)?"""
    try:
        _apply(tok, [{"role": "system", "content": _MARK}, *_PROBE], template, kwargs, False)
    except Exception:  # noqa: BLE001 - whatever the template raises
        return False
    return True


def default_system(tok: Any, messages: list[dict], template: str | None, kwargs: dict) -> str:
    """The system prompt the template writes for ``messages`` when they hold none (ChatML's
    "You are a helpful assistant."), or "": the text between a system message's place and what
    follows it, read off the same conversation rendered with and without one."""
    try:
        bare = _apply(tok, messages, template, kwargs, False)
        marked = _apply(
            tok, [{"role": "system", "content": _MARK}, *messages], template, kwargs, False
        )
    except Exception:  # noqa: BLE001 - the caller renders (and reports) these messages itself
        return ""
    pre, _, post = marked.partition(_MARK)
    if len(bare) >= len(pre) + len(post) and bare.startswith(pre) and bare.endswith(post):
        return bare[len(pre) : len(bare) - len(post)]
    return ""


def chat_ids(
    tok: Any, messages: list[dict], template: str | None, kwargs: dict, prefill: bool = False
) -> list[int]:
    """Rendered and tokenized once, no special tokens added (the template holds them)."""
    text = render_text(tok, messages, template, kwargs, prefill)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def plain_ids(tok: Any, text: str) -> list[int]:
    """A plain prompt with the tokenizer's special tokens, but never a doubled BOS."""
    ids = list(tok(text)["input_ids"])
    bos = tok.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos and tok.bos_token:
        if text.startswith(tok.bos_token):  # the text was pre-rendered with its BOS
            ids = ids[1:]
    return ids


def fill(template: str, where: str, **values: str) -> str:
    """``str.format`` with a clear error for a template naming an unknown field."""
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(
            f"cannot fill the template {template!r} ({type(e).__name__}: {e})",
            where,
            "use only the fields {prompt} and {context} (double literal braces: {{ }})",
        ) from None


def with_context(
    messages: list[dict], context: str, r: RolloutConfig, default: str = "", placement: str = ""
) -> list[dict]:
    """A copy of ``messages`` holding ``context`` in the configured place (``placement``
    overrides ``r.context_placement``); a new system message starts with ``default`` (the
    template's default system prompt)."""
    block = fill(r.context_template, "rollout.context_template", context=context)
    out = [dict(m) for m in messages]
    sep = r.context_separator
    if (placement or r.context_placement) == "system":
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + sep + block
        else:
            out.insert(
                0, {"role": "system", "content": default + sep + block if default else block}
            )
        return out
    users = [i for i, m in enumerate(out) if m["role"] == "user"]
    if not users:
        raise UserError(
            "rollout.context_placement=user but a conversation has no user message",
            "rollout.context_placement",
            "use context_placement=system",
        )
    out[users[-1]]["content"] = block + sep + out[users[-1]]["content"]
    return out


# ----------------------------------------------------------------------------- multi-turn
def turns(row: dict, expand: bool, final_assistant: str = "continue") -> list[Turn]:
    """The generation points of one prompts row (see the module docstring)."""
    msgs, answer = row.get("messages"), row.get("answer")
    if msgs is None:
        return [Turn(row["id"], None, 0, answer)]
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    last_reply = msgs[-1]["role"] == "assistant"
    if not expand or not assistant:
        if last_reply and final_assistant == "regenerate":
            reply = msgs[-1]["content"]
            return [Turn(row["id"], msgs[:-1], len(assistant) - 1, answer or reply)]
        return [Turn(row["id"], msgs, len(assistant) - last_reply, answer, last_reply)]
    out = [
        Turn(
            f"{row['id']}@t{k}",
            msgs[:i],
            k,
            (answer or msgs[i]["content"]) if i == len(msgs) - 1 else msgs[i]["content"],
        )
        for k, i in enumerate(assistant)
        if any(m["role"] in ("user", "tool") for m in msgs[:i])
    ]
    if not last_reply:
        out.append(Turn(f"{row['id']}@t{len(assistant)}", msgs, len(assistant), answer))
    return out


# ----------------------------------------------------------------------------- the three prefixes
@dataclass
class Renderer:
    """Renders the student's and the teacher's prefixes of a prompts row (one per ``Turn``)."""

    r: RolloutConfig
    student_tok: Any
    teacher_tok: Any  # the student's when no teacher tokenizer is configured
    template: str | None = None
    fallbacks: int = 0  # contexts placed in the user turn: the template has no system role
    _system: dict = field(default_factory=dict)  # (tokenizer, kwargs) -> has a system role

    @staticmethod
    def of(r: RolloutConfig, student_tok: Any, teacher_tok: Any | None = None) -> Renderer:
        return Renderer(r, student_tok, teacher_tok or student_tok, load_template(r.chat_template))

    def train_ids(self, t: Turn, row: dict) -> list[int]:
        """The student's prefix: never the context."""
        if t.messages is None:
            return plain_ids(self.student_tok, self._plain("prompt_template", row, None))
        return chat_ids(
            self.student_tok, t.messages, self.template, self.r.template_kwargs, t.prefill
        )

    def guided_ids(self, t: Turn, row: dict) -> list[int]:
        """The student's prefix with the context (EDGE-OPD guided rollout)."""
        ctx = row.get("context")
        if t.messages is None:
            return plain_ids(self.student_tok, self._plain("guided_template", row, ctx))
        return self._with_context(self.student_tok, self.r.template_kwargs, t, ctx)

    def teacher_ids(self, t: Turn, row: dict) -> list[int]:
        """The teacher's prefix: the context (when the row has one) in the configured place,
        rendered with the teacher tokenizer's template and the teacher's keyword arguments."""
        ctx = row.get("context")
        if t.messages is None:
            key = "teacher_template" if ctx is not None else "prompt_template"
            return plain_ids(self.teacher_tok, self._plain(key, row, ctx))
        kw = self.r.teacher_template_kwargs
        if ctx is None:
            return chat_ids(self.teacher_tok, t.messages, self.template, kw, t.prefill)
        return self._with_context(self.teacher_tok, kw, t, ctx)

    def _with_context(self, tok: Any, kwargs: dict, t: Turn, ctx: str) -> list[int]:
        """Chat ids with the context placed: in the system message (after the template's
        default system prompt when the conversation has none), or in the user turn when the
        template has no system role (counted in ``fallbacks``)."""
        placement, default = self.r.context_placement, ""
        if placement == "system" and t.messages[0]["role"] != "system":
            key = (id(tok), json.dumps(kwargs, sort_keys=True, default=str))
            if key not in self._system:
                self._system[key] = supports_system(tok, self.template, kwargs)
            if not self._system[key]:
                placement = "user"
                if not self.fallbacks:
                    log.info(
                        f"[chat] the chat template of {tok.name_or_path or 'a tokenizer'} has no "
                        "system role: the context goes to the user turn "
                        "(rollout.context_placement=user)"
                    )
                self.fallbacks += 1
            else:
                default = default_system(tok, t.messages, self.template, kwargs)
        msgs = with_context(t.messages, ctx, self.r, default, placement)
        return chat_ids(tok, msgs, self.template, kwargs, t.prefill)

    def _plain(self, key: str, row: dict, ctx: str | None) -> str:
        values = {"prompt": row["prompt"]} | ({"context": ctx} if ctx is not None else {})
        return fill(getattr(self.r, key), f"rollout.{key}", **values)


# ----------------------------------------------------------------------------- compatibility
SPECIAL_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")


def id_map_fingerprint(tok: Any) -> str:
    """Hash of the id -> token map alone (what makes token ids mean the same thing)."""
    vocab = sorted((i, t) for t, i in tok.get_vocab().items())
    return "ids-" + hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def check_compatible(toks: dict[str, Any], where: str) -> dict:
    """Refuse tokenizers whose id -> token maps differ; return the special-token settings of each
    (differences there change no id and are allowed: recorded in the manifest)."""
    names = list(toks)
    fps = {n: id_map_fingerprint(t) for n, t in toks.items()}
    first = names[0]
    for n in names[1:]:
        if fps[n] != fps[first]:
            a, b = toks[first].get_vocab(), toks[n].get_vocab()
            diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
            raise UserError(
                f"the {first} and {n} tokenizers differ: they map ids to different tokens "
                f"(e.g. {diff}), so token ids would not mean the same thing",
                where,
                "use models that share one vocabulary (cross-tokenizer distillation is not "
                "supported); EOS/pad/BOS settings may differ",
            )
    specials = {n: {a: getattr(t, a, None) for a in SPECIAL_ATTRS} for n, t in toks.items()}
    differs = sorted({a for a in SPECIAL_ATTRS if len({str(s[a]) for s in specials.values()}) > 1})
    return {"id_map": fps[first], "special_tokens": specials, "special_differences": differs}
