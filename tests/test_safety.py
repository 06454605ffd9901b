"""The small rules behind the hardening (#28), one by one on real files: the name rule, SQL
identifier quoting, symlinks out of a run, model folder JSON checks, the prompt length precheck.
The CLI cases (exit 2, one line, nothing touched) are in tests/test_bad_inputs.py and
tests/test_hostile_bucket.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from stages.lib import input_limits, model_checks, safety
from stages.lib.errors import UserError
from stages.lib.layout import check_name


@pytest.mark.parametrize(
    "name",
    [
        "ok\n",
        "ok\r",
        "a/b",
        "..",
        ".hidden",
        "-rf",
        "a..b",
        "",
        "x" * 129,
        "é",
        "a b",
        'a"b',
        None,
        3,
    ],
)
def test_unsafe_names_are_refused_by_one_rule(name):
    assert not safety.is_safe_name(name)
    with pytest.raises(UserError, match="not a safe name"):
        check_name(name, "train.name")


@pytest.mark.parametrize("name", ["ok", "topk_fkl-entropy_half", "a.b", "_x", "9", "x" * 128])
def test_safe_names_pass(name):
    assert safety.is_safe_name(name) and check_name(name, "k") == name


def test_error_line_is_one_line_even_with_newlines_in_names():
    e = UserError("bad name 'a\nb'", "/x/a\nb", "rename\r\nit")
    assert "\n" not in e.line() and "\r" not in e.line()
    assert "a\\nb" in e.line()


def test_quote_ident_keeps_a_hostile_name_a_name():
    con = duckdb.connect()
    name = "x\" AS SELECT 1; COPY (SELECT 42) TO '/tmp/never.csv'; --"
    con.execute(f"CREATE VIEW {safety.quote_ident(name)} AS SELECT 7 AS v")
    assert con.execute(f"SELECT v FROM {safety.quote_ident(name)}").fetchone() == (7,)
    assert not Path("/tmp/never.csv").exists()


def test_symlinks_out_of_the_run_are_found(tmp_path):
    run, out = tmp_path / "run", tmp_path / "outside"
    (run / "selected").mkdir(parents=True)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert safety.symlink_escapes(run / "selected" / "a", run) == []  # not there yet: fine
    (run / "selected" / "a").symlink_to(out)
    assert safety.symlink_escapes(run / "selected" / "a", run)[0][1] == out.resolve()
    with pytest.raises(UserError, match="outside the run dir"):
        safety.check_output(run / "selected" / "a" / "bucket=000", run, "select.name=a")
    # a symlink inside the dataset folder
    (run / "tokens").mkdir()
    (run / "tokens" / "bucket=000").symlink_to(out)
    assert safety.symlink_escapes(run / "tokens", run)
    # a symlink that stays inside the run is fine; the run dir itself may be a symlink
    (run / "rollouts").mkdir()
    (run / "selected" / "b").symlink_to(run / "rollouts")
    assert safety.symlink_escapes(run / "selected" / "b", run) == []
    alias = tmp_path / "alias"
    alias.symlink_to(run)
    assert safety.symlink_escapes(alias / "rollouts", alias) == []
    assert (out / "keep.txt").read_text() == "x"


def _model(tmp_path: Path, tiny_lm: Path) -> Path:
    m = tmp_path / "m"
    shutil.copytree(tiny_lm, m)
    return m


def test_model_folder_checks(tmp_path, tiny_lm):
    m = _model(tmp_path, tiny_lm)
    model_checks.check_no_custom_code(m, "student")
    model_checks.check_tokenizer_ids(m, "student")
    rows = model_checks.embedding_rows(m)
    assert model_checks.tokenizer_max_id(m)[0] == rows - 1  # the tiny LM: one row per id
    cfg = json.loads((m / "config.json").read_text())
    # auto_map beside a built-in model type: transformers uses its own code, nothing to refuse
    (m / "config.json").write_text(json.dumps(cfg | {"auto_map": {"AutoConfig": "x.C"}}))
    model_checks.check_no_custom_code(m, "student")
    (m / "config.json").write_text(
        json.dumps(cfg | {"model_type": "nope", "auto_map": {"AutoConfig": "x.C"}})
    )
    with pytest.raises(UserError, match="custom code"):
        model_checks.check_no_custom_code(m, "student")
    (m / "config.json").write_text(json.dumps(cfg | {"vocab_size": rows - 1}))
    with pytest.raises(UserError, match="embedding rows"):
        model_checks.check_tokenizer_ids(m, "student")


def test_prompt_precheck_refuses_only_what_cannot_fit(tiny_lm):
    import pyarrow as pa

    from data_schemas import prompts
    from stages.lib import models

    tok = models.load_tokenizer(str(tiny_lm))
    limit = 50
    n = input_limits.CHARS_PER_TOKEN * (limit + input_limits.MARGIN)
    rows = [
        {"id": "short", "prompt": "w1 w2"},
        {"id": "long_words", "prompt": "x" * (n + 10)},  # one unknown word: 1 token, may fit
        {"id": "huge", "prompt": "w1 " * n},
    ]
    t = prompts.from_rows(rows, "test")
    kept, skipped = input_limits.precheck(t, tok, limit, "skip", "rollout.max_prompt_tokens")
    assert kept["id"].to_pylist() == ["short", "long_words"]
    assert [s["id"] for s in skipped] == ["huge"]
    with pytest.raises(UserError, match="not tokenized"):
        input_limits.precheck(t, tok, limit, "error", "rollout.max_prompt_tokens")
    assert input_limits.precheck(t.slice(0, 2), tok, limit, "error", "w")[1] == []
    assert isinstance(kept, pa.Table)
