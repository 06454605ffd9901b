"""Scoring provenance: every model's tokenizer against the rollouts', and Lightning OPD's teacher
consistency (the scoring teacher is the SFT teacher) per teacher."""

from __future__ import annotations

from data_schemas import manifest as manifest_mod
from stages.lib import chat, models, rollout_plan, store, xtok
from stages.lib.config import Config
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.scoring.plan import Role


def check_sft_teacher(
    cfg: Config, layout: RunLayout, t_roles: dict[str, Role], used: set[str] | None = None
) -> dict:
    """Lightning OPD's teacher consistency: the SFT data's teacher must be this teacher (with
    several teachers: each one that scores rollouts, ``used``, on its own). Returns
    ``{"sft_data": <dataset id>}`` when an SFT dataset was checked, else {}."""
    sft_m = manifest_mod.read(layout.sft_data)
    if sft_m is None:
        return {}
    if cfg.teachers:
        _check_sft_per_teacher(cfg, layout, t_roles, used or set(), sft_m["fingerprints"])
        return {"sft_data": sft_m["dataset_id"]}
    sft_teacher = sft_m["fingerprints"].get("teacher")
    t_fp = t_roles[""].fingerprint
    if sft_teacher != t_fp and not cfg.score.allow_teacher_mismatch:
        raise UserError(
            f"the OPD teacher {cfg.teacher.path} ({t_fp}) is not the SFT teacher ({sft_teacher}) "
            "that wrote sft_data/; Lightning OPD's teacher consistency requires the same one",
            f"{layout.sft_data} / teacher.path",
            "use the SFT teacher as teacher.path, or set score.allow_teacher_mismatch=true",
        )
    return {"sft_data": sft_m["dataset_id"]}


def _check_sft_per_teacher(
    cfg: Config, layout: RunLayout, t_roles: dict[str, Role], used: set[str], sft_fps: dict
) -> None:
    """Each routed teacher that scores rollouts must be the SFT teacher of its prompts: the SFT
    data's ``teacher.<name>`` fingerprint when it has one per teacher, else its one ``teacher``."""
    if cfg.score.allow_teacher_mismatch:
        return
    for name in sorted(used):
        want = sft_fps.get(f"teacher.{name}", sft_fps.get("teacher"))
        got = t_roles[name].fingerprint
        if want is not None and got != want:
            raise UserError(
                f"OPD teacher {name!r} ({got}) scores rollouts but is not the SFT teacher "
                f"({want}) that wrote sft_data/; Lightning OPD's teacher consistency holds per "
                "teacher",
                f"{layout.sft_data} / teachers.{name}",
                "route those prompts to the SFT teacher, or set score.allow_teacher_mismatch=true",
            )


def scoring_teachers(cfg: Config) -> dict[str, object]:
    """The score stage's teachers by name: ``teachers``, or ``{"": teacher}`` for one."""
    return dict(cfg.teachers) if cfg.teachers else {"": cfg.teacher}


def _teacher_roles(cfg: Config, s_tok, fps: dict) -> dict[str, Role]:
    """The teachers' roles by name (fingerprints added to ``fps``), tokenizers checked."""
    out = {}
    for name, m in scoring_teachers(cfg).items():
        t_fp = models.model_fingerprint(m.path, "teacher")
        out[name] = Role("teacher", m.path, m.dtype, t_fp, cfg.score.topk, cfg.score.entropy)
        if not name:
            fps["teacher"] = t_fp
            continue
        t_tok = models.load_tokenizer(m.path, f"teacher {name}")
        chat.check_compatible({"student": s_tok, f"teacher {name}": t_tok}, f"teachers.{name}")
        fps[f"teacher.{name}"] = t_fp
    return out


def check_models(cfg: Config, rm: dict, layout: RunLayout) -> tuple[list[Role], dict, object]:
    """Roles with fingerprints, after the provenance checks; also the fingerprints and tokenizer.
    With several teachers, ``roles`` holds the first one (plan_shard routes each row)."""
    sc = cfg.score
    fps_in = rm.get("fingerprints", {})
    tok_fp = fps_in.get("tokenizer")
    policy_path = store.model_path(rm, "policy", "policy_path", layout.rollouts) or cfg.student.path
    first = next(iter(scoring_teachers(cfg).values()))
    if not first.path:
        raise UserError("no teacher model configured", "teacher.path", "set teacher.path=DIR")
    tok = models.load_tokenizer(first.path, "teacher")
    vocab = models.vocab_size(tok)
    if tok_fp is None:
        raise UserError(
            "the rollouts manifest has no tokenizer fingerprint",
            str(layout.rollouts),
            "re-run the rollout stage with this version of distillery",
        )
    # Same id -> token maps (EOS/pad settings may differ); the rollouts' own tokenizer unchanged.
    s_dir = rollout_plan.tokenizer_dir(policy_path, cfg.student.path) if policy_path else None
    s_tok = models.load_tokenizer(s_dir or cfg.student.path, "student")
    models.check_same_tokenizer(tok_fp, models.tokenizer_fingerprint(s_tok), "rollouts'", "student")
    if sc.cross_tokenizer == "align" and xtok.differ(s_tok, tok):
        tok = s_tok  # a teacher of another tokenizer (xtok_setup): the tokens are in student ids
        vocab = models.vocab_size(tok)
    else:
        chat.check_compatible({"student": s_tok, "teacher": tok}, "student.path / teacher.path")
    for k_name, k_val in (("score.topk", sc.topk), ("score.behavior_topk", sc.behavior_topk)):
        if k_val > vocab:
            raise UserError(
                f"{k_name}={k_val} exceeds the vocabulary size {vocab}",
                k_name,
                f"set {k_name} <= {vocab}",
            )
    if sc.behavior_topk and not sc.behavior:
        raise UserError(
            "score.behavior_topk needs the behaviour pass",
            "score.behavior=false",
            "set score.behavior=true or score.behavior_topk=0",
        )
    fps = {"student": fps_in.get("student")}
    t_roles = _teacher_roles(cfg, s_tok, fps)
    fps["tokenizer"] = tok_fp
    roles = [next(iter(t_roles.values()))]
    if sc.behavior:
        if not policy_path:
            raise UserError(
                "no behaviour model: the rollouts manifest has no extra.policy_path and "
                "student.path is not set",
                "student.path",
                "set student.path to the model that sampled the rollouts",
            )
        b_tok = models.load_tokenizer(policy_path, "behaviour")
        chat.check_compatible({"student": s_tok, "behaviour": b_tok}, str(policy_path))
        b_fp = models.model_fingerprint(policy_path, "behaviour")
        expected = fps_in.get("policy") or (
            fps_in.get("student") if not (rm.get("extra") or {}).get("policy_path") else None
        )
        if expected and expected != b_fp:
            raise UserError(
                f"the behaviour model {policy_path} ({b_fp}) is not the one that sampled the "
                f"rollouts ({expected}): its weights changed",
                f"{policy_path} / {layout.rollouts}",
                "restore the model, or re-run the rollout stage (overwrite=true)",
            )
        roles.append(
            Role("behavior", policy_path, cfg.student.dtype, b_fp, sc.behavior_topk, sc.entropy)
        )
        fps["behavior"] = b_fp
    if cfg.ref.path:
        r_tok = models.load_tokenizer(cfg.ref.path, "ref")
        chat.check_compatible({"student": s_tok, "ref": r_tok}, "student.path / ref.path")
        r_fp = models.model_fingerprint(cfg.ref.path, "ref")
        roles.append(Role("ref", cfg.ref.path, cfg.ref.dtype, r_fp, 0, False))
        fps["ref"] = r_fp
    return roles, fps, tok, t_roles
