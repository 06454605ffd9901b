"""The demo world: a word-level tokenizer, a private-facts task and tiny Llamas trained from zero.

The default experiment is EDGE-OPD's problem. A student must internalize PRIVATE facts it cannot
produce on its own, taught by a self-teacher: the same base model reading the private evidence in
its context. Everything is generated here (no downloads) and is deterministic for a fixed seed.

Writes (under ``out_dir``, default ``runs/world``)::

    models/base/          tiny LlamaForCausalLM + PreTrainedTokenizerFast (save_pretrained format)
    models/teacher_big/   >= 4x the base's parameters, also knows the private facts (optional)
    prompts/train.parquet               private + public closed-book questions, evidence as context
    prompts/private_closed.parquet      private facts, training question templates
    prompts/private_paraphrase.parquet  private facts, held-out question templates
    prompts/public_closed.parquet       public facts (retention)
    prompts/reading.parquet             open-book, evidence inside the prompt (capability retention)
    prompts/train_mix.parquet           train + open-book reading anchors
    prompts/train_fit.parquet           train_mix without the held-out anchors of val.parquet
    prompts/val.parquet                 validation carved from train_mix (validation_split)
    world.json            settings, cache key, sizes, chance levels, timings, greedy accuracies

Chat format (the rest of the pipeline relies on it): prompt rows are ``messages``::

    messages = [{"role": "system", "content": "you are a helpful assistant ."},   (optional)
                {"role": "user", "content": "question : what is the capital of zorbia ? answer :"}]
    context  = "evidence : the leader of zorbia is mira dost . the capital of zorbia is vexton ."
    teacher  = the same messages with the context appended to the system message (created when
               absent), as the pipeline's rollout.context_placement=system does
    response = "the capital of zorbia is vexton ."  followed by <|im_end|> (the EOS)

rendered by the ChatML template :data:`CHAT_TEMPLATE` (``<bos><|im_start|>system ...<|im_end|>
<|im_start|>user ...<|im_end|><|im_start|>assistant``). Open-book reading rows hold the evidence
inside the user message. A model is trained on the rendered prefix ids + the response ids +
``<|im_end|>``, with the loss on the response tokens and the EOS. Years are written as digits ("1423")
and tokenized as digit pairs, so they decode as "14 23": compare answers with
:func:`answer_matches`, which normalizes both sides the same way.

Run: ``python scripts/make_demo.py --out runs/world [--teacher-big] [--quick]``.
A second call with the same settings (and the same version of this file) returns at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from data_schemas import prompts as prompts_schema
from stages.lib import grading

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
PAD, UNK, BOS, OLD_EOS, IM_START, IM_END = SPECIAL_TOKENS
EOS = IM_END  # a chat model ends its turn with <|im_end|>

# ChatML with a leading BOS (the template writes it; rendering adds no special tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# System prompts the chat rows carry (None: no system message; the teacher's evidence then
# creates one), chosen per row by a hash of its id.
SYSTEM_PROMPTS: list[str | None] = [
    "you are a helpful assistant .",
    "answer the question in one sentence .",
    "you know the countries of the world .",
    None,
]

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    """Architecture and pretraining schedule of one tiny Llama."""

    hidden: int = 128
    layers: int = 3
    heads: int = 2  # head_dim = hidden / heads: 64 (or 32/128) for vLLM's CPU kernels
    intermediate: int = 512
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.hidden // self.heads not in (32, 64, 128):
            raise ValueError("head_dim = hidden / heads must be 32, 64 or 128 (vLLM CPU kernels)")


@dataclass(frozen=True)
class WorldSettings:
    """Everything that determines a world; its hash is the cache key."""

    seed: int = 0
    n_public: int = 60  # entities whose facts the base learns closed-book
    n_private: int = 60  # entities whose facts only appear as evidence
    n_reading_names: int = 80  # extra names used for open-book reading practice and eval
    n_capitals: int = 160  # pool sizes set the chance level of a closed-book guess
    n_first_names: int = 40
    n_last_names: int = 40
    year_range: tuple[int, int] = (1100, 1999)
    max_distractors: int = 2  # other-attribute sentences about the same entity in the evidence
    train_templates_per_attr: int = 3  # the rest of TEMPLATES[attr] is held out (paraphrases)
    public_train_rows: int = 0  # 0 = as many public rows in train.parquet as private ones
    n_reading_eval: int = 300
    # Open-book reading prompts (fresh facts, evidence inside the prompt) appended to train.parquet
    # in train_mix.parquet: anchors that keep the student reading while it learns private facts.
    n_reading_train: int = 1200
    # Share of closed-book public QA in each pretraining batch; the rest is open-book reading.
    closed_frac: float = 0.35
    base: ModelSettings = field(default_factory=ModelSettings)
    # Past base.steps the base trains on until it reads well: in chunks of converge_chunk steps
    # at the constant rate converge_lr, at most converge_max_steps more, until its greedy
    # accuracy on the validation split (the held-out reading anchors, and the private training
    # questions read with their evidence, the self-teacher's view) reaches converge_target on
    # both. A fixed step count left some world seeds a weak reader and so a weak self-teacher
    # (reading 84.7 % with seed 2 against 100 % with seed 1; docs/RESULTS.md).
    converge_target: float = 0.95
    converge_chunk: int = 250
    converge_max_steps: int = 2000
    converge_lr: float = 3e-4
    teacher_big: bool = False
    teacher: ModelSettings = field(
        default_factory=lambda: ModelSettings(
            hidden=256, layers=4, heads=4, intermediate=768, steps=700, lr=2e-3, warmup=50
        )
    )
    # Share of closed-book private QA in the teacher's batches (on top of the base corpus).
    teacher_private_frac: float = 0.5
    eval_max_new_tokens: int = 16
    eval_batch: int = 256
    # Torch CPU threads of the build: a parallel reduction's order depends on it, so it is part
    # of the key (the same count on every machine gives the same bits).
    threads: int = 2
    # "native": the fastest kernels of this CPU (the bits differ between CPUs); "portable":
    # torch's AVX2 kernels and MKL's conditional numerical reproducibility mode
    # (MKL_CBWR=COMPATIBLE), one code path on every x86 CPU with AVX2, so the same bits, but about
    # 2.8x slower here (PORTABLE_ENV; docs/RESULTS.md), so not the default.
    kernels: str = "native"

    @staticmethod
    def quick() -> WorldSettings:
        """Tiny sizes and few steps: a complete world in a few seconds, for tests."""
        tiny = ModelSettings(
            hidden=64, layers=1, heads=1, intermediate=128, steps=30, batch=16, warmup=5
        )
        return WorldSettings(
            n_public=6,
            n_private=6,
            n_reading_names=6,
            n_capitals=20,
            n_first_names=6,
            n_last_names=6,
            n_reading_eval=20,
            n_reading_train=10,
            base=tiny,
            converge_max_steps=0,
            teacher=dataclasses.replace(tiny, hidden=128, heads=2, layers=2, intermediate=256),
        )


# Set before torch is imported: torch's AVX2 kernels (present on every x86 CPU since 2013; an
# AVX-512 CPU otherwise takes other reduction orders and other exp/log approximations) and MKL's
# CPU-independent code path. Measured on a quick world: thread count, torch kernel path and MKL's
# instruction set each changed the weights' bits; with these two settings and a fixed thread count
# the bits matched across MKL_ENABLE_INSTRUCTIONS=AVX512/AVX2/AVX (docs/RESULTS.md).
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def kernels_active() -> str:
    """The mode this process computes in: "portable" when PORTABLE_ENV took effect, else "native"."""
    cap = torch.backends.cpu.get_cpu_capability()
    ok = cap == "AVX2" and os.environ.get("MKL_CBWR") == PORTABLE_ENV["MKL_CBWR"]
    return "portable" if ok else "native"


def settings_from_dict(d: dict[str, Any]) -> WorldSettings:
    """Inverse of ``dataclasses.asdict`` (for world.json round trips)."""
    d = dict(d)
    d["base"] = ModelSettings(**d["base"])
    d["teacher"] = ModelSettings(**d["teacher"])
    d["year_range"] = tuple(d["year_range"])
    return WorldSettings(**d)


def cache_key(settings: WorldSettings) -> str:
    """Settings + this file's source: editing the generator invalidates old worlds."""
    src = Path(__file__).read_bytes()
    d = dataclasses.asdict(settings)
    if not settings.teacher_big:  # teacher settings do not change a base-only world
        del d["teacher"], d["teacher_private_frac"]
    blob = json.dumps(d, sort_keys=True).encode() + src
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The world: entities, facts, templates, texts
# ---------------------------------------------------------------------------------------------

ATTRS = ["capital", "color", "leader", "founded", "export"]

# Question templates per attribute; the first `train_templates_per_attr` are used for training
# prompts about private entities, the rest only in private_paraphrase.parquet. The base sees all
# of them on public/reading data, so a paraphrase tests the fact, not the wording.
TEMPLATES: dict[str, list[str]] = {
    "capital": [
        "what is the capital of {e} ?",
        "which city is the capital of {e} ?",
        "name the capital of {e} .",
        "the capital city of {e} is called what ?",
    ],
    "color": [
        "what is the color of {e} ?",
        "which color belongs to {e} ?",
        "name the color of {e} .",
        "{e} is known for which color ?",
    ],
    "leader": [
        "who is the leader of {e} ?",
        "who leads {e} ?",
        "name the leader of {e} .",
        "the ruler of {e} is who ?",
    ],
    "founded": [
        "when was {e} founded ?",
        "in what year was {e} founded ?",
        "name the founding year of {e} .",
        "{e} dates from which year ?",
    ],
    "export": [
        "what is the main export of {e} ?",
        "what does {e} export most ?",
        "name the main export of {e} .",
        "{e} is best known for exporting what ?",
    ],
}

# The response (and the evidence sentence) for each attribute.
SENTENCES: dict[str, str] = {
    "capital": "the capital of {e} is {v} .",
    "color": "the color of {e} is {v} .",
    "leader": "the leader of {e} is {v} .",
    "founded": "{e} was founded in {v} .",
    "export": "the main export of {e} is {v} .",
}

COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "pink",
    "brown",
    "gold",
    "silver",
    "teal",
    "crimson",
    "violet",
]
EXPORTS = [
    "copper",
    "silk",
    "salt",
    "timber",
    "wool",
    "tea",
    "olive oil",
    "iron ore",
    "glass",
    "amber",
    "spices",
    "cotton",
    "marble",
    "wine",
    "fish",
    "horses",
    "paper",
    "pearls",
    "rice",
    "coffee",
    "tin",
    "leather",
    "honey",
    "dyes",
    "sugar cane",
    "fine cloth",
    "clay pots",
    "rope",
    "wax",
    "ivory",
]

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "th",
    "sh",
    "br",
    "dr",
    "kr",
    "st",
    "gl",
    "tr",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "x", "m"]
_SUFFIX = {
    "entity": ["ia", "land", "or", "ar", "istan", "ova"],
    "capital": ["ton", "burg", "ville", "holm", "grad", "port"],
    "first": ["a", "o", "el", "in", "us", "ra"],
    "last": ["dost", "vane", "mor", "ley", "rick", "sen"],
}


def _answer_sizes(settings: WorldSettings) -> dict[str, int]:
    """Number of possible values of each attribute: a uniform guess is right 1/size of the time."""
    lo, hi = settings.year_range
    return {
        "capital": settings.n_capitals,
        "color": len(COLORS),
        "leader": settings.n_first_names * settings.n_last_names,
        "founded": hi - lo + 1,
        "export": len(EXPORTS),
    }


def _make_names(rng: random.Random, kind: str, n: int, taken: set[str]) -> list[str]:
    """Invented single-token names (letters only, so the pre-tokenizer keeps them whole)."""
    out: list[str] = []
    while len(out) < n:
        syl = [
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.choice([1, 2]))
        ]
        name = "".join(syl) + rng.choice(_SUFFIX[kind])
        if name not in taken and 4 <= len(name) <= 12:
            taken.add(name)
            out.append(name)
    return out


@dataclass
class World:
    """Names, value pools and the facts of public and private entities."""

    settings: WorldSettings
    public: list[str]
    private: list[str]
    reading: list[str]
    capitals: list[str]
    first_names: list[str]
    last_names: list[str]
    facts: dict[str, dict[str, str]]  # entity -> attr -> value (public and private only)

    def random_value(self, rng: random.Random, attr: str) -> str:
        if attr == "capital":
            return rng.choice(self.capitals)
        if attr == "color":
            return rng.choice(COLORS)
        if attr == "leader":
            return f"{rng.choice(self.first_names)} {rng.choice(self.last_names)}"
        if attr == "founded":
            return str(rng.randint(*self.settings.year_range))
        return rng.choice(EXPORTS)

    def random_facts(self, rng: random.Random) -> dict[str, str]:
        return {a: self.random_value(rng, a) for a in ATTRS}


def make_world(settings: WorldSettings) -> World:
    """Draw names and facts. Capitals are unique per known entity, other values may repeat."""
    rng = random.Random(settings.seed)
    # Reserve every template word so no invented name collides with the scaffolding.
    taken = set(_base_words())
    ents = _make_names(
        rng, "entity", settings.n_public + settings.n_private + settings.n_reading_names, taken
    )
    capitals = _make_names(rng, "capital", settings.n_capitals, taken)
    first = _make_names(rng, "first", settings.n_first_names, taken)
    last = _make_names(rng, "last", settings.n_last_names, taken)
    public = ents[: settings.n_public]
    private = ents[settings.n_public : settings.n_public + settings.n_private]
    reading = ents[settings.n_public + settings.n_private :]
    if settings.n_capitals < len(public) + len(private):
        raise ValueError("n_capitals must cover every public and private entity")
    caps = rng.sample(capitals, len(public) + len(private))
    world = World(settings, public, private, reading, capitals, first, last, {})
    for i, e in enumerate(public + private):
        f = world.random_facts(rng)
        f["capital"] = caps[i]
        world.facts[e] = f
    return world


def prompt_text(attr: str, entity: str, template: int) -> str:
    """The closed-book question: ``question : ... answer :``."""
    return f"question : {TEMPLATES[attr][template].format(e=entity)} answer :"


def response_text(attr: str, entity: str, value: str) -> str:
    """The target answer sentence (without EOS)."""
    return SENTENCES[attr].format(e=entity, v=value)


def evidence_text(
    attr: str, entity: str, facts: dict[str, str], rng: random.Random, max_distractors: int
) -> str:
    """``evidence : <fact> [distractor facts about the same entity]`` in a random order."""
    others = [a for a in ATTRS if a != attr]
    chosen = [attr] + rng.sample(others, rng.randint(0, max_distractors))
    rng.shuffle(chosen)
    return "evidence : " + " ".join(response_text(a, entity, facts[a]) for a in chosen)


def guided_prefix(context: str | None, prompt: str) -> str:
    """An open-book user message: the evidence, then the question."""
    return prompt if not context else f"{context} {prompt}"


def system_prompt(key: str) -> str | None:
    """The system prompt of a row (a fixed function of its id)."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return SYSTEM_PROMPTS[h % len(SYSTEM_PROMPTS)]


def chat_messages(user: str, system: str | None) -> list[dict[str, str]]:
    sys = [{"role": "system", "content": system}] if system else []
    return sys + [{"role": "user", "content": user}]


def teacher_messages(messages: list[dict[str, str]], context: str | None) -> list[dict[str, str]]:
    """The messages with the evidence where the pipeline's default placement puts it."""
    if not context:
        return messages
    from stages.lib import chat
    from stages.lib.config import RolloutConfig

    return chat.with_context(messages, context, RolloutConfig())


def prefix_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """The rendered chat prefix (with the generation prompt), tokenized once."""
    from stages.lib import chat

    return chat.chat_ids(tok, messages, None, {})


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """Letter runs, single digits, punctuation runs (digits split finer than the tokenizer's
    pairs, so "1423" and "14 23" compare equal)."""
    return grading.words(text)


def _base_words() -> list[str]:
    texts = ["question answer evidence : ? . system user assistant"]
    texts += [p for p in SYSTEM_PROMPTS if p] + [t for ts in TEMPLATES.values() for t in ts]
    texts += list(SENTENCES.values()) + COLORS + EXPORTS + [str(d) for d in range(10)]
    digit_pairs = [f"{d:02d}" for d in range(100)]
    words: list[str] = []
    for t in texts:
        for w in _words(t.replace("{e}", "").replace("{v}", "")):
            if w not in words:
                words.append(w)
    return words + digit_pairs


def vocabulary(world: World) -> list[str]:
    """Special tokens first (pad=0, unk=1, bos=2, <eos>=3, <|im_start|>=4, <|im_end|>=5), then
    every word in a fixed order."""
    vocab = list(SPECIAL_TOKENS) + _base_words()
    for w in (
        world.public
        + world.private
        + world.reading
        + world.capitals
        + world.first_names
        + world.last_names
    ):
        if w not in vocab:
            vocab.append(w)
    return vocab


def make_tokenizer(vocab: list[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` with chat special tokens and a ChatML template:
    BOS prepended to plain text, no EOS appended, EOS = <|im_end|>, left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab)}
    tk = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    tk.normalizer = None
    # Whitespace splits letters/punctuation; digit pairs keep the vocabulary small ("1423" ->
    # "14" "23"). One token per digit was tried: the 3-layer base could not copy 4-digit years
    # from evidence (repeated digits confuse its induction heads): 8% reading accuracy on years.
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated")]
    )
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])]
    )
    # WordPiece's decoder with an empty prefix joins tokens with single spaces and nothing else.
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        additional_special_tokens=[IM_START, OLD_EOS],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ---------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------


def _row(id_: str, prompt: str, context: str | None, answer: str, kind: str) -> dict[str, Any]:
    """A chat row: the question (or open-book text) as the user message, a system prompt."""
    return {
        "id": id_,
        "prompt": None,
        "messages": chat_messages(prompt, system_prompt(id_)),
        "context": context,
        "answer": answer,
        "kind": kind,
    }


def user_text(row: dict[str, Any]) -> str:
    """The user message of a demo row."""
    return row["messages"][-1]["content"]


def make_prompt_sets(world: World) -> dict[str, list[dict[str, Any]]]:
    """The five prompt files as lists of rows (schema ``data_schemas.prompts``)."""
    s = world.settings
    rng = random.Random(s.seed + 1)
    n_tr = s.train_templates_per_attr
    sets: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ["train", "private_closed", "private_paraphrase", "public_closed", "reading"]
    }
    for e in world.private:
        f = world.facts[e]
        for a in ATTRS:
            for t in range(n_tr):
                ev = evidence_text(a, e, f, rng, s.max_distractors)
                sets["train"].append(
                    _row(f"private-{e}-{a}-t{t}", prompt_text(a, e, t), ev, f[a], "private")
                )
            t = rng.randrange(n_tr)
            ev = evidence_text(a, e, f, rng, s.max_distractors)
            sets["private_closed"].append(
                _row(f"private-{e}-{a}-t{t}", prompt_text(a, e, t), ev, f[a], "private")
            )
            t = rng.randrange(n_tr, len(TEMPLATES[a]))
            ev = evidence_text(a, e, f, rng, s.max_distractors)
            sets["private_paraphrase"].append(
                _row(f"private-{e}-{a}-t{t}", prompt_text(a, e, t), ev, f[a], "private")
            )
    public_rows = []
    for e in world.public:
        f = world.facts[e]
        for a in ATTRS:
            for t in range(len(TEMPLATES[a])):
                ev = evidence_text(a, e, f, rng, s.max_distractors)
                public_rows.append(
                    _row(f"public-{e}-{a}-t{t}", prompt_text(a, e, t), ev, f[a], "public")
                )
            t = rng.randrange(len(TEMPLATES[a]))
            sets["public_closed"].append(
                _row(f"public-{e}-{a}-t{t}", prompt_text(a, e, t), None, f[a], "public")
            )
    n_pub = s.public_train_rows or len(sets["train"])
    sets["train"] += rng.sample(public_rows, min(n_pub, len(public_rows)))
    # Reading: fresh (entity, values) combinations; the evidence sits inside the prompt itself.
    sets["reading"] = _reading_rows(world, rng, s.n_reading_eval, "reading", "reading")
    # train_mix = train + open-book reading anchors, drawn from their own RNG so that adding them
    # changes none of the other sets.
    arng = random.Random(s.seed + 7)
    anchors = _reading_rows(world, arng, s.n_reading_train, "anchor", "reading_anchor")
    sets["train_mix"] = sets["train"] + anchors
    sets["train_fit"], sets["val"] = validation_split(sets["train_mix"])
    return sets


# Every VAL_EVERY-th row of each kind of train_mix goes into val.parquet (a pure function of
# train_mix: no RNG draws, so every other set and the models stay as they were).
VAL_EVERY = 6


def validation_split(train_mix: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict]]:
    """(train_fit, val) carved from the TRAINING prompts only, never from an eval set.

    val holds every VAL_EVERY-th reading anchor, held out (train_fit drops them: open-book
    prompts the student never trains on, to watch its reading), and every VAL_EVERY-th private
    and public training question, kept in train_fit too (closed-book facts can only be learnt
    from their own questions: these measure how well the training questions are fitted).
    """
    seen: dict[str, int] = {}
    fit, val = [], []
    for r in train_mix:
        i = seen[r["kind"]] = seen.get(r["kind"], -1) + 1
        held = i % VAL_EVERY == 0
        if held:
            val.append(r)
        if not (held and r["kind"] == "reading_anchor"):
            fit.append(r)
    return fit, val


def _reading_rows(
    world: World, rng: random.Random, n: int, id_prefix: str, kind: str
) -> list[dict[str, Any]]:
    """``n`` open-book prompts about reading names with fresh random facts (evidence in the prompt)."""
    rows = []
    for i in range(n):
        e = rng.choice(world.reading)
        f = world.random_facts(rng)
        a = rng.choice(ATTRS)
        t = rng.randrange(len(TEMPLATES[a]))
        ev = evidence_text(a, e, f, rng, world.settings.max_distractors)
        rows.append(
            _row(
                f"{id_prefix}-{i:05d}-{e}-{a}-t{t}",
                guided_prefix(ev, prompt_text(a, e, t)),
                None,
                f[a],
                kind,
            )
        )
    return rows


def write_prompts(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=prompts_schema.SCHEMA)
    # No timestamps are written by pyarrow, so two builds give byte-identical files.
    pq.write_table(table, path, compression="zstd")


# ---------------------------------------------------------------------------------------------
# Pretraining corpus (sampled on the fly)
# ---------------------------------------------------------------------------------------------


Example = tuple[list[dict[str, str]], str]  # (chat messages, response text)


def _random_system(rng: random.Random) -> str | None:
    return SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))]


def _closed_example(world: World, rng: random.Random, entities: list[str]) -> Example:
    e = rng.choice(entities)
    a = rng.choice(ATTRS)
    t = rng.randrange(len(TEMPLATES[a]))
    msgs = chat_messages(prompt_text(a, e, t), _random_system(rng))
    return msgs, response_text(a, e, world.facts[e][a])


def _reading_example(world: World, rng: random.Random) -> Example:
    # Public names keep their true facts (no contradiction with closed-book knowledge); private
    # and reading names get fresh random values, so the base learns to copy but never sees a
    # private fact. Private names must appear somewhere, or their embeddings stay untrained.
    pool = rng.choice(["public", "private", "reading", "reading"])
    if pool == "public" and world.public:
        e = rng.choice(world.public)
        f = world.facts[e]
    else:
        e = rng.choice(world.private if pool == "private" and world.private else world.reading)
        f = world.random_facts(rng)
    a = rng.choice(ATTRS)
    t = rng.randrange(len(TEMPLATES[a]))
    ev = evidence_text(a, e, f, rng, world.settings.max_distractors)
    system = _random_system(rng)
    # Half the time the evidence sits in the user message (open-book reading), half the time in
    # the system message (where the self-teacher reads it).
    if rng.random() < 0.5:
        msgs = chat_messages(guided_prefix(ev, prompt_text(a, e, t)), system)
    else:
        msgs = teacher_messages(chat_messages(prompt_text(a, e, t), system), ev)
    return msgs, response_text(a, e, f[a])


def sample_batch(
    world: World, rng: random.Random, n: int, private_frac: float = 0.0
) -> list[Example]:
    """(prefix, response) pairs: closed-book public (+ private for the big teacher), reading."""
    s = world.settings
    out = []
    for _ in range(n):
        u = rng.random()
        if u < private_frac:
            out.append(_closed_example(world, rng, world.private))
        elif u < private_frac + s.closed_frac * (1 - private_frac):
            out.append(_closed_example(world, rng, world.public))
        else:
            out.append(_reading_example(world, rng))
    return out


def encode_pairs(tok: Any, pairs: list[Example]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels (-100 except on response tokens + EOS)."""
    pre = [prefix_ids(tok, m) for m, _ in pairs]
    res = tok([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    seqs = [p + r + [tok.eos_token_id] for p, r in zip(pre, res, strict=True)]
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (p, x) in enumerate(zip(pre, seqs, strict=True)):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, len(p) : len(x)] = ids[i, len(p) : len(x)]
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def make_model(ms: ModelSettings, tok: Any, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=ms.hidden,
        intermediate_size=ms.intermediate,
        num_hidden_layers=ms.layers,
        num_attention_heads=ms.heads,
        num_key_value_heads=ms.heads,
        head_dim=ms.hidden // ms.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
    )
    # Eager attention: on this CPU it trains these tiny shapes faster than SDPA with a mask.
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pretrain(
    model: Any,
    tok: Any,
    world: World,
    ms: ModelSettings,
    seed: int,
    private_frac: float = 0.0,
    desc: str = "pretrain",
) -> dict[str, float]:
    """AdamW with linear warmup and cosine decay; short sequences padded to the batch max."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=ms.lr, betas=(0.9, 0.98), weight_decay=ms.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < ms.warmup:
            return ms.lr * (step + 1) / ms.warmup
        p = (step - ms.warmup) / max(1, ms.steps - ms.warmup)
        return ms.lr * (ms.min_lr_ratio + (1 - ms.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    model.train()
    ema = None
    bar = tqdm(range(ms.steps), desc=desc, mininterval=1.0, disable=ms.steps < 100)
    for step in bar:
        ids, _mask, labels = encode_pairs(tok, sample_batch(world, rng, ms.batch, private_frac))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # Right padding under a causal mask: real tokens never attend to the trailing pads, and
        # pads carry no loss, so the padding mask is redundant (and skipping it is faster).
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        v = loss.item()
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    return {"final_loss_ema": round(float(ema or 0.0), 4)}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


answer_matches = grading.answer_matches


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prefixes: list[list[int]],
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> list[str]:
    """Greedy decoding of token-id prefixes with the pipeline's decoder; the decoded responses."""
    from stages.lib import decoding

    outs = decoding.greedy(
        model, tokenizer, prefixes, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return tokenizer.batch_decode([o.response_ids for o in outs], skip_special_tokens=True)


def greedy_accuracy(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    use_context: bool,
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> float:
    """Share of rows whose greedy response contains ``row["answer"]`` (see answer_matches).

    ``use_context`` puts ``row["context"]`` into the system message (the self-teacher's view).
    """
    if not rows:
        return float("nan")
    prefixes = [
        prefix_ids(
            tokenizer, teacher_messages(r["messages"], r.get("context") if use_context else None)
        )
        for r in rows
    ]
    outs = greedy_generate(model, tokenizer, prefixes, max_new_tokens, batch_size)
    return sum(answer_matches(o, r["answer"]) for o, r in zip(outs, rows, strict=True)) / len(rows)


def row_attr_entity(row: dict[str, Any]) -> tuple[str, str]:
    """Every row id ends with ``-<entity>-<attr>-t<template>``."""
    *_, entity, attr, _t = row["id"].split("-")
    return attr, entity


def chance_accuracy(world: World, rows: list[dict[str, Any]]) -> float:
    """Expected accuracy of a uniform guess among the attribute's possible values."""
    sizes = _answer_sizes(world.settings)
    return sum(1 / sizes[row_attr_entity(r)[0]] for r in rows) / max(1, len(rows))


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def content_hash(out_dir: str | os.PathLike[str]) -> str:
    """sha256 (16 hex) of what a world *is*: each model's weight file, the tokenizer's vocabulary
    and every prompt file's rows (as JSON, so neither the pyarrow nor the transformers version that
    wrote the files changes it). Two builds with the same hash hold the same world."""
    root = Path(out_dir)
    h = hashlib.sha256()
    for f in sorted((root / "models").glob("*/model.safetensors")):
        h.update(f"{f.parent.name}\n".encode() + f.read_bytes())
    for f in sorted((root / "models").glob("*/tokenizer.json")):
        vocab = json.loads(f.read_text())["model"]["vocab"]
        h.update(json.dumps(vocab, sort_keys=True).encode())
    for f in sorted((root / "prompts").glob("*.parquet")):
        rows = pq.read_table(f).to_pylist()
        h.update(f"{f.name}\n".encode() + json.dumps(rows, sort_keys=True).encode())
    return h.hexdigest()[:16]


def is_complete(out_dir: str | os.PathLike[str], settings: WorldSettings) -> bool:
    p = Path(out_dir) / "world.json"
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text())["key"] == cache_key(settings)
    except (ValueError, KeyError):
        return False


def _evaluate(
    model: Any,
    tok: Any,
    sets: dict[str, list[dict[str, Any]]],
    s: WorldSettings,
    which: list[tuple[str, str, bool]],
) -> dict[str, float]:
    res = {}
    for name, set_name, ctx in which:
        acc = greedy_accuracy(model, tok, sets[set_name], ctx, s.eval_max_new_tokens, s.eval_batch)
        res[name] = round(acc, 4)
    return res


def converge_base(
    model: Any, tok: Any, world: World, val: list[dict[str, Any]], s: WorldSettings
) -> dict[str, Any]:
    """Train the base on past its schedule until it reads well (see WorldSettings.converge_*)."""
    reading = [r for r in val if r["kind"] == "reading_anchor"]
    private = [r for r in val if r["kind"] == "private"]

    def check(extra: int) -> dict[str, float]:
        return {
            "extra_steps": extra,
            "val_reading": round(greedy_accuracy(model, tok, reading, False), 4),
            "val_private_with_evidence": round(greedy_accuracy(model, tok, private, True), 4),
        }

    history, extra = [check(0)], 0
    chunk = dataclasses.replace(
        s.base, steps=s.converge_chunk, lr=s.converge_lr, warmup=0, min_lr_ratio=1.0
    )
    while (
        extra < s.converge_max_steps
        and min(history[-1]["val_reading"], history[-1]["val_private_with_evidence"])
        < s.converge_target
    ):
        info = pretrain(model, tok, world, chunk, s.seed + 200 + extra, 0.0, desc="base+")
        extra += s.converge_chunk
        history.append({**check(extra), **info})
    return {"extra_steps": extra, "converge": history}


def _train_and_save(
    name: str,
    ms: ModelSettings,
    world: World,
    tok: Any,
    dest: Path,
    seed: int,
    private_frac: float,
    converge: Any = None,
) -> tuple[Any, dict[str, Any]]:
    t0 = time.time()
    model = make_model(ms, tok, seed)
    info: dict[str, Any] = {
        "params": n_params(model),
        "non_embedding_params": n_params(model) - model.get_input_embeddings().weight.numel(),
    }
    info.update(pretrain(model, tok, world, ms, seed, private_frac, desc=name))
    if converge is not None:
        info.update(converge(model))
    info["train_seconds"] = round(time.time() - t0, 1)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, info


def _remove_stale_temps(out: Path) -> None:
    """Drop temp/trash dirs left by killed builds (their pid is gone, or it is ours)."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        alive = pid != os.getpid()
        if alive:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def build_world(
    out_dir: str | os.PathLike[str],
    settings: WorldSettings | None = None,
    force: bool = False,
    _in_child: bool = False,
) -> dict[str, Any]:
    """Build (or return the cached) world under ``out_dir``; returns the world.json content.

    The world is built in a temp dir next to ``out_dir`` and renamed into place at the end, and
    world.json (with the cache key) is written last, so a killed build never looks complete.
    """
    s = settings or WorldSettings()
    out = Path(out_dir)
    # A world that also has teacher_big serves a request without it (same base and data by
    # construction): `experiment=demo` after `demo_lightning` must not rebuild the world.
    with_big = dataclasses.replace(s, teacher_big=True)
    if not force and (is_complete(out, s) or is_complete(out, with_big)):
        return json.loads((out / "world.json").read_text())
    if s.kernels == "portable" and kernels_active() != "portable" and not _in_child:
        # torch reads ATEN_CPU_CAPABILITY and MKL reads MKL_CBWR once, at start: build in a fresh
        # process that sets them first.
        return _build_in_child(out, s, force)
    if s.kernels not in ("portable", "native"):
        raise ValueError(f"kernels must be 'portable' or 'native', not {s.kernels!r}")
    key = cache_key(s)  # taken before building: the key names the code that built the world
    torch.set_num_threads(s.threads)
    t_start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove_stale_temps(out)
    # Asking for teacher_big on top of an existing base-only world reuses its data and base
    # (they are identical by construction) and trains only the teacher.
    reuse = (
        s.teacher_big and not force and is_complete(out, dataclasses.replace(s, teacher_big=False))
    )
    try:
        world = make_world(s)
        vocab = vocabulary(world)
        tok = make_tokenizer(vocab)
        sets = make_prompt_sets(world)
        if reuse:
            shutil.copytree(out, tmp)
            (tmp / "world.json").unlink()  # the copy is incomplete until the new one is written
            models: dict[str, Any] = json.loads((out / "world.json").read_text())["models"]
            t_data = 0.0
        else:
            models, t_data = _build_data_and_base(s, world, tok, sets, tmp, t_start)
        if s.teacher_big:
            models["teacher_big"] = _build_teacher_big(s, world, tok, sets, tmp, models["base"])
        info = _world_info(key, s, world, tok, sets, models, t_data, t_start, reuse)
        info["content_hash"] = content_hash(tmp)
        info["kernels_active"] = {
            "mode": kernels_active(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        }
        # world.json last: its presence (with the key) marks the world complete.
        (tmp / "world.json").write_text(json.dumps(info, indent=2) + "\n")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(json.dumps(info))  # the same types a cached call returns


def _build_in_child(out: Path, s: WorldSettings, force: bool) -> dict[str, Any]:
    """Run the build in ``python scripts/make_demo.py --settings-json`` with PORTABLE_ENV set."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "make_demo.py"
    cmd = [sys.executable, str(script), "--out", str(out)]
    cmd += ["--settings-json", json.dumps(dataclasses.asdict(s))] + (["--force"] if force else [])
    subprocess.run(cmd, check=True, env={**os.environ, **PORTABLE_ENV})
    return json.loads((out / "world.json").read_text())


# (accuracy name, prompt set, with evidence) the base and teacher_big are evaluated on
_BASE_EVALS = [
    ("private_closed", "private_closed", False),
    ("private_paraphrase", "private_paraphrase", False),
    ("public_closed", "public_closed", False),
    ("reading", "reading", False),
    ("private_closed_with_evidence", "private_closed", True),
    ("private_paraphrase_with_evidence", "private_paraphrase", True),
]
_TEACHER_EVALS = _BASE_EVALS[:4]


def _build_data_and_base(
    s: WorldSettings,
    world: World,
    tok: Any,
    sets: dict[str, list[dict[str, Any]]],
    tmp: Path,
    t_start: float,
) -> tuple[dict[str, Any], float]:
    """Write the prompt sets and train the base under ``tmp``; returns (models entry, data s)."""
    (tmp / "prompts").mkdir(parents=True)
    for name, rows in sets.items():
        write_prompts(rows, tmp / "prompts" / f"{name}.parquet")
    t_data = time.time() - t_start

    # Base: must read evidence but not know private facts.
    base, base_info = _train_and_save(
        "base",
        s.base,
        world,
        tok,
        tmp / "models" / "base",
        s.seed + 100,
        0.0,
        converge=lambda m: converge_base(m, tok, world, sets["val"], s),
    )
    base_acc = _evaluate(base, tok, sets, s, _BASE_EVALS)
    print(f"base: {base_info['params']:,} params, accuracy {base_acc}", flush=True)
    return {"base": {**base_info, "accuracy": base_acc, "path": "models/base"}}, t_data


def _build_teacher_big(
    s: WorldSettings,
    world: World,
    tok: Any,
    sets: dict[str, list[dict[str, Any]]],
    tmp: Path,
    base_info: dict[str, Any],
) -> dict[str, Any]:
    """Train teacher_big under ``tmp``; returns its models entry (size relative to the base)."""
    big, big_info = _train_and_save(
        "teacher_big",
        s.teacher,
        world,
        tok,
        tmp / "models" / "teacher_big",
        s.seed + 200,
        s.teacher_private_frac,
    )
    big_acc = _evaluate(big, tok, sets, s, _TEACHER_EVALS)
    print(f"teacher_big: {big_info['params']:,} params, accuracy {big_acc}", flush=True)
    return {
        **big_info,
        "accuracy": big_acc,
        "path": "models/teacher_big",
        "params_ratio_to_base": round(big_info["params"] / base_info["params"], 2),
    }


def _world_info(
    key: str,
    s: WorldSettings,
    world: World,
    tok: Any,
    sets: dict[str, list[dict[str, Any]]],
    models: dict[str, Any],
    t_data: float,
    t_start: float,
    reuse: bool,
) -> dict[str, Any]:
    """The content of world.json: key, settings, formats, tokenizer ids, sizes, models."""
    lengths = {name: _max_lengths(tok, rows) for name, rows in sets.items()}
    return {
        "key": key,
        "settings": dataclasses.asdict(s),
        "format": {
            "messages": "[system: <system prompt>] user: question : <question> answer :",
            "context": "evidence : <sentence> [<sentence> ...]",
            "teacher": "the context appended to the system message (created when absent)",
            "chat_template": CHAT_TEMPLATE,
            "response": "<sentence> then <|im_end|>",
        },
        "tokenizer": {
            "vocab_size": len(tok),
            "pad_id": tok.pad_token_id,
            "unk_id": tok.unk_token_id,
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
        },
        "sizes": {
            "public_entities": len(world.public),
            "private_entities": len(world.private),
            "reading_names": len(world.reading),
            "attributes": ATTRS,
            "rows": {k: len(v) for k, v in sets.items()},
            "answer_space": _answer_sizes(s),
        },
        "max_tokens": lengths,
        "chance_accuracy": {
            k: round(chance_accuracy(world, v), 4)
            for k, v in sets.items()
            if not k.startswith("train")
        },
        "models": models,
        "seconds": {"data": round(t_data, 1), "total": round(time.time() - t_start, 1)},
        "reused_base": reuse,
    }


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (an older ``out`` is moved aside, then removed)."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def _max_lengths(tok: Any, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Token counts the pipeline sizes its buffers by (BOS included, EOS in the response)."""
    p = [prefix_ids(tok, r["messages"]) for r in rows]
    g = [prefix_ids(tok, teacher_messages(r["messages"], r["context"])) for r in rows]
    resp = tok(
        [response_text(*row_attr_entity(r), r["answer"]) for r in rows], add_special_tokens=False
    )["input_ids"]
    return {
        "prompt": max(map(len, p)),
        "guided_prefix": max(map(len, g)),
        "response_with_eos": 1 + max(map(len, resp)),
    }
