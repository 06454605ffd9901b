"""Answer grading: does a response contain the reference answer? One function for eval and rollout.

Modes (``eval.match`` / ``rollout.match``):

- ``words`` (default): the answer's words occur as a contiguous whole-word run in the response,
  case-insensitive, with letter runs, single digits and punctuation runs as words (so "1423"
  matches a decoded "14 23", and "vexton." matches "vexton").
- ``exact``: the stripped response equals the stripped answer.
- ``contains``: the answer is a substring of the response (case-sensitive).
- ``normalised``: like ``exact`` after lower-casing, dropping punctuation and collapsing spaces
  (SQuAD-style normalisation).
- ``regex``: the answer is a regular expression searched in the response.
"""

from __future__ import annotations

import re
import string

MODES = ("words", "exact", "contains", "normalised", "regex")

_WORD_RE = re.compile(r"\d|[^\W\d]+|[^\w\s]+")
_PUNCT = str.maketrans("", "", string.punctuation)


def words(text: str) -> list[str]:
    """Letter runs, single digits, punctuation runs, lower-cased."""
    return _WORD_RE.findall(text.lower())


def normalise(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def answer_matches(response_text: str, answer: str, mode: str = "words") -> bool:
    """True when ``response_text`` holds ``answer`` under ``mode`` (see the module docstring)."""
    if mode == "words":
        r, a = words(response_text), words(answer)
        if not a:
            return False
        return any(r[i : i + len(a)] == a for i in range(len(r) - len(a) + 1))
    if mode == "exact":
        return response_text.strip() == answer.strip()
    if mode == "contains":
        return bool(answer) and answer in response_text
    if mode == "normalised":
        return normalise(response_text) == normalise(answer)
    if mode == "regex":
        return re.search(answer, response_text) is not None
    raise ValueError(f"unknown grading mode {mode!r}; one of {', '.join(MODES)}")
