"""The prompts table: what the user gives the pipeline (``data.prompts``).

Columns: ``id`` (str, unique) and exactly one of ``prompt`` (str, plain text) or ``messages`` (a
list of ``{role, content}`` with role system / user / assistant / tool and string content), plus
optional ``context`` (str, the privileged information a guided rollout or a self-teacher reads),
``answer`` (str, a verifiable reference answer) and ``kind`` (str, a free label reports group by).

Common chat layouts are read to the same rows (``chat_layout``): TRL's conversational
``prompt`` (a message list) and its ``completion`` (the reference answer unless ``answer`` is set),
ShareGPT's ``conversations`` of ``{from, value}`` (``human``/``gpt``/``system``/...; a top-level
``system`` string becomes the system message), and OpenAI content parts (``content`` a list of
``{type: text, text}``, joined; any other part type is refused). Layouts that hold no prompt
(a ``text`` column, Alpaca's instruction/input/output, an implicit-prompt preference pair) are
one error naming the layout and the fix. A string holding a lone surrogate (an escaped
``"\ud800"`` in JSON) is refused: it is not text.

Sources: JSONL (one object per line, UTF-8), Parquet, or a folder written by ``datasets``'
``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose split ``data.split`` is read). Types are
strict: an id or prompt that is not a string, a message that is not ``{role, content}`` with a known
role and string content, a row with both or neither of prompt/messages, is one error naming the row.
Other keys are ignored.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

NAME = "prompts"
VERSION = 2  # 2: ``messages`` added, ``prompt`` nullable (one of the two per row)

ROLES = ("system", "user", "assistant", "tool")
MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=True),
        pa.field("context", pa.string(), nullable=True),
        pa.field("answer", pa.string(), nullable=True),
        pa.field("kind", pa.string(), nullable=True),
        pa.field("messages", pa.list_(MESSAGE), nullable=True),  # added in version 2
    ]
)
OPTIONAL_STR = ("context", "answer", "kind")

from data_schemas.common import SchemaError, TableSpec, check_table  # noqa: E402

SPEC = TableSpec(name=NAME, schema=SCHEMA, keys=("id",))
FIX = (
    "each row needs a string 'id' and either a non-empty string 'prompt' or 'messages' "
    "(a list of {role, content}); optional string context, answer, kind"
)


def _bad(what: str, where: str) -> SchemaError:
    return SchemaError(f"prompts: {what}", where, FIX)


def text_of(content: Any, row: str, i: int, role: str, where: str) -> str:
    """A message's text: a string, or OpenAI content parts (text parts joined, as templates that
    read parts write them; any other part is refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise SchemaError(
                    f"prompts: row {row}: message {i} ({role}) content part {k} is "
                    f"{'a ' + repr(kind) if kind else 'not a {type, text}'} part; only text "
                    "parts are read",
                    where,
                    "keep the text parts (drop images/audio) or give 'content' as a string",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"row {row}: message {i} ({role}) has no string 'content'", where)


def check_messages(value: Any, row: str, where: str) -> list[dict[str, str]]:
    """A message list as ``[{role, content}]`` (strict: known roles, string or text-part content)."""
    if not isinstance(value, list) or not value:
        raise _bad(f"row {row}: 'messages' must be a non-empty list of {{role, content}}", where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"row {row}: message {i} is not an object with a string 'role'", where)
        if m["role"] not in ROLES:
            raise _bad(f"row {row}: message {i} has role {m['role']!r}, not one of {ROLES}", where)
        out.append(
            {"role": m["role"], "content": text_of(m.get("content"), row, i, m["role"], where)}
        )
    if all(m["role"] in ("system", "assistant") for m in out):
        raise _bad(f"row {row}: the messages hold no user or tool turn", where)
    return out


# ShareGPT speaker names (``from``) -> roles
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool",
    "observation": "tool", "function_response": "tool",
}  # fmt: skip
# layouts without a prompt -> (their name, how to turn them into prompts)
NO_PROMPT = {
    "text": ("a language-modeling row ('text' only)", "give each row a 'prompt' or 'messages'"),
    "instruction": (
        "an Alpaca row (instruction/input/output)",
        "map it to 'messages' ([{role: user, content: instruction + input}]) and 'answer' (output)",
    ),
    "chosen": (
        "a preference row without a prompt (chosen/rejected hold the whole conversation)",
        "give the shared turns as 'prompt' (TRL's explicit-prompt layout)",
    ),
}


def sharegpt(value: Any, system: Any, label: str, where: str) -> list[dict]:
    """ShareGPT ``conversations`` -> ``[{role, content}]`` (``{from, value}`` or OpenAI keys)."""
    fix = "ShareGPT rows need 'conversations': [{from: human|gpt|system|tool, value: TEXT}, ...]"
    if not isinstance(value, list) or not value:
        raise SchemaError(f"prompts: row {label}: 'conversations' is not a list", where, fix)
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and "from" in m:
            who = m.get("from")
            role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
            if role is None:
                raise SchemaError(
                    f"prompts: row {label}: ShareGPT turn {i} is from {who!r}, not one of "
                    f"{sorted(SHAREGPT_ROLES)}",
                    where,
                    fix,
                )
            out.append({"role": role, "content": m.get("value")})
        else:
            out.append(m)  # {role, content}: checked as messages
    if isinstance(system, str) and system and out[0].get("role") != "system":
        out.insert(0, {"role": "system", "content": system})
    return out


def chat_layout(raw: dict, label: str, where: str) -> tuple[Any, Any, Any]:
    """(prompt, messages, completion) of a row in any layout read (module docstring)."""
    prompt, messages = raw.get("prompt"), raw.get("messages")
    convs = raw.get("conversations")
    if convs is not None:
        if prompt is not None or messages is not None:
            raise _bad(
                f"row {label}: 'conversations' (ShareGPT) and prompt/messages are both set", where
            )
        messages = sharegpt(convs, raw.get("system"), label, where)
    if isinstance(prompt, list):  # TRL's conversational layout
        if messages is not None:
            raise _bad(f"row {label}: 'prompt' is a message list and 'messages' is set too", where)
        prompt, messages = None, prompt
    if prompt is None and messages is None:
        for key, (name, fix) in NO_PROMPT.items():
            if raw.get(key) is not None:
                raise SchemaError(
                    f"prompts: row {label} is {name}: no prompt to answer", where, fix
                )
    return prompt, messages, raw.get("completion")


def completion_text(value: Any, label: str, where: str) -> str | None:
    """TRL's ``completion`` as a reference answer: a string, or one assistant message's text."""
    if value is None or isinstance(value, str):
        return value
    one = value[0] if isinstance(value, list) and len(value) == 1 else None
    if not isinstance(one, dict) or one.get("role") != "assistant":
        raise _bad(f"row {label}: 'completion' must be a string or one assistant message", where)
    return text_of(one.get("content"), label, 0, "assistant", where)


def check_text(value: Any, label: str, where: str) -> None:
    """Every string in a row must be text: JSON can escape a lone surrogate, UTF-8 cannot hold it."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise SchemaError(
                    f"prompts: row {label}: a string holds a lone surrogate "
                    f"({v[e.start]!r} at character {e.start}), which is not text",
                    where,
                    "write the character itself, or its full surrogate pair in JSON escapes",
                ) from None
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def normalise_row(raw: Any, n: int, where: str) -> dict[str, Any]:
    """One input row (a dict of Python values) as a schema row, or one clear error."""
    if not isinstance(raw, dict):
        raise _bad(f"row {n} is not an object", where)
    rid = raw.get("id")
    if not isinstance(rid, str) or not rid:
        raise _bad(f"row {n}: 'id' must be a non-empty string, got {rid!r}", where)
    label = f"{n} (id {rid!r})"
    check_text(raw, label, where)
    prompt, messages, completion = chat_layout(raw, label, where)
    if prompt is None and messages is None:
        raise _bad(
            f"row {label}: missing column 'prompt' (or 'messages', or ShareGPT "
            "'conversations'); needs exactly one of them",
            where,
        )
    if prompt is not None and messages is not None:
        raise _bad(
            f"row {label}: has both 'prompt' and 'messages'; needs exactly one of them", where
        )
    if isinstance(prompt, str) and not prompt.strip():
        raise _bad(f"row {label}: empty prompt text", where)
    if prompt is not None and not isinstance(prompt, str):
        raise _bad(f"row {label}: 'prompt' must be a non-empty string, got {prompt!r:.60}", where)
    row = {"id": rid, "prompt": prompt}
    for col in OPTIONAL_STR:
        v = raw.get(col)
        if v is not None and not isinstance(v, str):
            raise _bad(f"row {label}: '{col}' must be a string or null, got {v!r:.60}", where)
        row[col] = v
    row["messages"] = None if messages is None else check_messages(messages, label, where)
    if row["answer"] is None:
        row["answer"] = completion_text(completion, label, where)
    return row


def validate(table: pa.Table, *, where: str = "prompts") -> pa.Table:
    """Check a table (any column order, optional columns absent) and return it in schema form."""
    return from_rows(table.to_pylist(), where)


def from_rows(rows: list[Any], where: str) -> pa.Table:
    """Strictly checked rows -> the schema table (unique ids checked by check_table)."""
    if not rows:
        raise SchemaError("prompts file is empty", where, FIX)
    norm = [normalise_row(r, n, where) for n, r in enumerate(rows, 1)]
    return check_table(pa.Table.from_pylist(norm, schema=SCHEMA), SPEC, where=where)


def _jsonl_rows(p: Any) -> list[Any]:
    import json

    rows = []
    for n, raw in enumerate(p.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SchemaError(
                f"prompts: invalid UTF-8 on line {n} (byte {e.start})", str(p), "save it as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SchemaError(
                f"prompts: malformed JSON on line {n} ({e.msg})", str(p), FIX
            ) from None
        except RecursionError:  # the decoder recurses per nesting level
            raise SchemaError(
                f"prompts: the JSON on line {n} is nested too deeply", str(p), FIX
            ) from None
    return rows


def _disk_rows(p: Any, split: str) -> list[Any]:
    """Rows of a ``datasets.save_to_disk`` folder (``Dataset`` or ``DatasetDict``)."""
    try:
        import datasets
    except ImportError:
        raise SchemaError(
            "prompts: a save_to_disk folder needs the `datasets` package",
            str(p),
            "pip install datasets",
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SchemaError(
            f"prompts: not a datasets save_to_disk folder ({str(e).splitlines()[0][:160]})",
            str(p),
            "point data.prompts at a JSONL or Parquet file, or a save_to_disk folder",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SchemaError(
                f"prompts: split {split!r} not in the DatasetDict (splits {sorted(ds)})",
                str(p),
                f"set data.split to one of {sorted(ds)}",
            )
        ds = ds[split]
    return ds.to_list()


def read(path: str | None, *, max_prompts: int | None = None, split: str = "train") -> pa.Table:
    """Read and validate prompts (JSONL, Parquet or a save_to_disk folder), one clear error per
    problem; ``split`` picks the split of a DatasetDict folder."""
    from pathlib import Path

    import pyarrow.parquet as pq

    fix = "a JSONL or Parquet file (or a datasets save_to_disk folder) with id and prompt/messages"
    if not path:
        raise SchemaError(
            "no prompts file configured", "data.prompts", f"set data.prompts to {fix}"
        )
    p = Path(path)
    if p.is_dir():
        rows = _disk_rows(p, split)
    elif not p.is_file():
        raise SchemaError(f"prompts file not found: {path}", "data.prompts", f"point it at {fix}")
    elif p.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(p)
    else:
        try:
            rows = pq.read_table(p).to_pylist()
        except RecursionError:
            raise SchemaError("prompts: a value is nested too deeply", str(p), FIX) from None
        except (pa.ArrowInvalid, OSError) as e:
            raise SchemaError(f"cannot read prompts as Parquet ({e})", str(p), fix) from None
    if max_prompts is not None:
        rows = rows[:max_prompts]
    try:
        return from_rows(rows, str(p))
    except RecursionError:  # a value nested thousands deep (it is never a valid row)
        raise SchemaError("prompts: a value is nested too deeply", str(p), FIX) from None


def source_sha256(path: str, split: str = "train") -> str:
    """Identity of a prompts source: the file's sha256, or for a save_to_disk folder the hash of
    its files' names and contents and the split read."""
    import hashlib
    from pathlib import Path

    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    if p.is_dir():
        h.update(split.encode())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
