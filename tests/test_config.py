"""Every primary config and every experiment composes into the typed Config; bad keys fail."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stages.lib.config import (
    CONF_DIR,
    Config,
    TrainVariant,
    as_dict,
    compose,
    derive,
    loss_arguments,
    quote,
    round_config,
    sft_config,
    variant_config,
)
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout

PRIMARIES = ["rollout", "score", "select", "train", "eval", "sft", "report", "pipeline"]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUP_FILES = {
    g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml"))
    for g in ("select", "loss", "model", "data", "rollout", "score", "train", "eval")
}


@pytest.mark.parametrize("stage", PRIMARIES)
def test_primary_composes(stage):
    cfg = compose(stage)
    assert isinstance(cfg, Config) and cfg.stage == stage


@pytest.mark.parametrize("exp", EXPERIMENTS)
@pytest.mark.parametrize("stage", PRIMARIES)
def test_experiment_composes(stage, exp):
    cfg = compose(stage, [f"experiment={exp}"])
    assert cfg.run_dir.startswith("runs/") and cfg.student.path and cfg.teacher.path
    assert cfg.data.prompts


@pytest.mark.parametrize("group,name", [(g, n) for g, ns in GROUP_FILES.items() for n in ns])
def test_every_group_option_composes(group, name):
    key = {"model": "model@student"}.get(group, group)
    cfg = compose("train", [f"{key}={name}"])
    if group == "select":
        assert cfg.select.name == name and cfg.select.rules
    if group == "loss":
        assert cfg.loss.name == name and cfg.loss.terms[0].name == name


def test_cli_overrides_win_over_experiment():
    cfg = compose("train", ["experiment=demo", "loss=vopd", "select=entropy_half"])
    assert (cfg.loss.name, cfg.select.name, cfg.train.name) == (
        "vopd",
        "entropy_half",
        "vopd-entropy_half",
    )
    assert cfg.run_dir == "runs/demo"


def test_design_keys_exist():
    cfg = compose(
        "rollout",
        [
            "run_dir=x",
            "seed=3",
            "student.path=s",
            "teacher.path=t",
            "ref.path=r",
            "data.prompts=p.jsonl",
        ],
    )
    assert (
        cfg.run_dir,
        cfg.seed,
        cfg.student.path,
        cfg.teacher.path,
        cfg.ref.path,
        cfg.data.prompts,
    ) == ("x", 3, "s", "t", "r", "p.jsonl")


def test_mistyped_key_fails_at_compose():
    with pytest.raises(UserError, match=r"unknown config key 'rollout.temprature'.*rollout.temp"):
        compose("rollout", ["rollout.temprature=0.5"])


@pytest.mark.parametrize("form", ["", "+", "++"])
@pytest.mark.parametrize("key", ["train.bogus", "train.epoch", "bogus", "trian.lr", "train.lora.x"])
def test_unknown_key_refused_in_every_form(form, key):
    with pytest.raises(UserError) as e:
        compose("train", [f"{form}{key}=1"])
    line = e.value.line()
    assert f"unknown config key '{key}'" in line and "closest valid keys: " in line
    assert "\n" not in line


def test_close_keys_are_suggested():
    with pytest.raises(UserError, match=r"closest valid keys: train\.lr"):
        compose("train", ["trian.lr=1"])
    with pytest.raises(UserError, match=r"closest valid keys: .*rollout\.temperature"):
        compose("train", ["+rollout.temperatur=1"])


def test_free_dict_keys_still_take_plus():
    """Keys under a dict-typed node (eval sets, policy params, loss kwargs) are the user's."""
    cfg = compose("eval", ["experiment=demo", "+data.eval_sets.extra=x.parquet"])
    assert cfg.data.eval_sets["extra"] == "x.parquet"
    cfg = compose("train", ["loss=topk_rkl", "+loss.terms.0.kwargs.renormalize=false"])
    assert cfg.loss.terms[0].kwargs["renormalize"] is False


@pytest.mark.parametrize(
    "override,match",
    [
        ("loss.terms.0.name=topk_fk", r"unknown loss 'topk_fk'.*closest: topk_fkl"),
        ("+loss.terms.0.kwargs.tail=1", r"unknown argument 'tail' for loss 'opd_k1'.*is_clip"),
        ("+loss.terms.0.kwargs.is_clip=yes please", r"is_clip must be"),
        ("train.lr=inf", r"train.lr must be finite"),
        ("train.lr=nan", r"train.lr must be finite"),
        ("train.betas=[0.9,inf]", r"train.betas must be finite"),
        ("rollout.temperature=inf", r"rollout.temperature must be finite"),
        ("train.name=..", r"train.name='\.\.' is not a safe name"),
        ("train.name=../../x", r"train.name='\.\./\.\./x' is not a safe name"),
        ("train.name=''", r"train.name='' is not a safe name"),
        ("train.name=a/b", r"train.name='a/b' is not a safe name"),
        ("train.selection=../x", r"train.selection='\.\./x' is not a safe name"),
        ("select.name=a/b", r"select.name='a/b' is not a safe name"),
        ("run_dir=''", r"run_dir is empty"),
        (
            "select.rules.0.policy=entropyy",
            r"unknown selection policy 'entropyy'.*closest: entropy",
        ),
        ("+select.rules.0.params.rho=nan", r"params.rho must be finite"),
        ("pipeline.stages=[rollout,scor]", r"unknown stage 'scor'.*closest: score"),
        ("student.dtype=fp8", r"model dtype must be"),
        ("train.freeze=['mlp(']", r"train.freeze.*not a valid regular expression"),
        ("train.freeze=['']", r"train.freeze.*not a valid regular expression"),
    ],
)
def test_bad_values_fail_at_compose_with_one_line(override, match):
    with pytest.raises(UserError, match=match) as e:
        compose("train", [override])
    assert "\n" not in e.value.line()


def test_freeze_with_lora_is_refused_at_compose():
    with pytest.raises(UserError, match=r"train.freeze.*is for full fine-tuning"):
        compose("train", ["train.freeze=[mlp]", "train.lora.r=4"])


def test_kl_set_must_be_an_eval_set():
    with pytest.raises(UserError, match=r"eval.kl_set='nope' is not among the eval sets.*reading"):
        compose("eval", ["experiment=demo", "eval.kl_set=nope"])
    with pytest.raises(UserError, match=r"eval.kl_set='reading' is not among"):
        compose("eval", ["experiment=demo", "eval.sets=[private_closed]", "eval.kl_set=reading"])
    with pytest.raises(UserError, match=r"eval set 'readin' is not in data.eval_sets"):
        compose("eval", ["experiment=demo", "eval.sets=[readin]"])
    assert compose("eval", ["experiment=demo", "eval.kl_set=reading"]).eval.kl_set == "reading"


def test_loss_arguments_come_from_the_loss_functions():
    from stages.lib import losses

    args = set(loss_arguments("tropd"))
    assert {"tau", "outlier"} <= args and not args & {"vocab_size", "temperature", "batch"}
    for name in losses.LOSSES:  # every loss file's kwargs are accepted arguments
        cfg = compose("train", [f"loss={name}"])
        assert set(cfg.loss.terms[0].kwargs) <= set(loss_arguments(name))


def test_variant_names_are_checked():
    bad = "pipeline.variants=[{name: ../x, overrides: []}]"
    with pytest.raises(UserError, match=r"pipeline.variants\[\].name='\.\./x' is not a safe"):
        compose("pipeline", [bad])
    dup = "pipeline.variants=[{name: a, overrides: []}, {name: a, overrides: []}]"
    with pytest.raises(UserError, match="names must be unique"):
        compose("pipeline", [dup])
    same = "pipeline.variants=[{name: opd_k1-all, overrides: []}]"
    with pytest.raises(UserError, match="main training's train.name"):
        compose("pipeline", [same])


# ----------------------------------------------------------------------------- derived configs
def test_variant_is_the_command_line_plus_its_overrides():
    cfg = compose("pipeline", ["experiment=demo", "train.lr=0.01"])
    v = variant_config(cfg, TrainVariant("x", ["loss=vopd", "select=entropy_half"]))
    direct = compose(
        "pipeline",
        ["experiment=demo", "train.lr=0.01", "loss=vopd", "select=entropy_half", "train.name=x"],
    )
    assert (v.loss.name, v.select.name, v.train.selection, v.train.name) == (
        "vopd",
        "entropy_half",
        "entropy_half",  # the selection follows the select group, as on the command line
        "x",
    )
    assert v.train.lr == 0.01 and v.pipeline.variants == []
    assert as_dict(v)["train"] == as_dict(direct)["train"]
    assert as_dict(v)["select"] == as_dict(direct)["select"]
    assert cfg.loss.name == "topk_fkl"  # the original is untouched
    # an untyped parameter gets the type the command line gives it
    r = derive(cfg, ["select=evidence_retain", "select.rules.1.params.weight=3.5", "seed=3"], "t")
    assert r.select.rules[1].params["weight"] == 3.5 and r.seed == 3
    w = derive(cfg, ["select=all", "loss=opd_k1"], "t")
    assert (w.train.selection, w.train.name) == ("all", "opd_k1-all")


def test_round_config(tmp_path):
    run = tmp_path / "a b" / "it's ${x}"  # quoting survives spaces, quotes and '${'
    cfg = compose("pipeline", ["experiment=demo", f"run_dir={quote(run)}", "train.name=t"])
    assert cfg.run_dir == str(run)
    r2, r3 = round_config(cfg, 2), round_config(cfg, 3)
    lay = RunLayout.of(run)
    assert (r2.run_dir, r2.train.name, r2.seed) == (str(lay.round(2).root), "t-r2", 1)
    assert r2.student.path == str(lay.final("t"))
    assert r3.student.path == str(lay.round(2).final("t-r2")) and r3.seed == 2
    assert r3.train.init is None and not r3.sft.enabled and r3.pipeline.variants == []
    assert (r3.loss, r3.select, r3.teacher, r3.ref) == (cfg.loss, cfg.select, cfg.teacher, cfg.ref)


def test_sft_config():
    cfg = compose("sft", ["experiment=demo_lightning", "sft.epochs=5", "sft.lr=2e-3"])
    s = sft_config(cfg)
    assert (s.train.name, s.train.selection, s.loss.name) == ("sft", "sft", "sft")
    assert (s.train.epochs, s.train.lr, s.train.init) == (5, 2e-3, cfg.student.path)
    assert s.rollout.guided_fraction == 1.0
    assert s.rollout.guided_template == cfg.rollout.teacher_template == "{prompt}"
    # the rollout settings the SFT data's dataset id hashes are those the stage always used
    old = dataclasses.replace(
        cfg.rollout, guided_template=cfg.rollout.teacher_template, guided_fraction=1.0
    )
    assert s.rollout == old
    assert (s.run_dir, s.seed, s.data) == (cfg.run_dir, cfg.seed, cfg.data)


def test_derive_needs_a_composed_config():
    with pytest.raises(UserError, match="not built by compose"):
        derive(Config(), ["seed=1"], "t")
    cfg = compose("pipeline", ["experiment=demo"])
    edited = dataclasses.replace(cfg, seed=7)  # an edit the source does not know about
    with pytest.raises(UserError, match=r"changed after compose\(\) \(seed\)"):
        round_config(edited, 2)
    cfg.train.lr = 0.5
    with pytest.raises(UserError, match=r"\(train.lr\)"):
        sft_config(cfg)


def test_config_dirs_are_kept_for_derived_configs(tmp_path):
    own = tmp_path / "conf" / "experiment"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/demo\n  - override /loss: vopd\n"
        "run_dir: runs/mine\n"
    )
    cfg = compose("pipeline", ["experiment=mine"], config_dirs=[tmp_path / "conf"])
    assert (cfg.loss.name, cfg.run_dir) == ("vopd", "runs/mine")
    assert round_config(cfg, 2).run_dir == str(Path("runs/mine/round2"))


@pytest.mark.parametrize(
    "override",
    [
        "rollout.guided_fraction=1.5",
        "rollout.top_p=0",
        "score.topk=0",
        "worker.index=3",
        "train.lr=-1",
    ],
)
def test_impossible_values_are_user_errors(override):
    with pytest.raises(UserError, match="impossible config value"):
        compose("rollout", [override])
