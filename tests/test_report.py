"""Report stage: plots, a self-contained HTML page, partial runs, and the page in headless Chromium.

The run dir is built here with the shard store: the tiny student samples real responses, the tiny
teacher and the student score them (full-vocabulary fp32 log-softmax, gathered), two selections
weight the tokens, plus two training logs and an eval results file.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_schemas import manifest
from data_schemas import rollouts as rollouts_schema
from data_schemas import selected as selected_schema
from data_schemas import tokens as tokens_schema
from stages import report
from stages.lib import store
from stages.lib.config import as_dict, compose
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.reporting import browser
from tests.conftest import write_prompts

K = 8
REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


# ----------------------------------------------------------------------------- building a run
@torch.inference_mode()
def _score(model, prefix: list[int], resp: list[int], k: int) -> dict:
    ids = torch.tensor([prefix + resp])
    logits = model(input_ids=ids).logits[0, len(prefix) - 1 : -1].float()  # [T, V]
    lp = torch.log_softmax(logits, -1)  # [T, V]
    top = lp.topk(k, -1)  # [T, K]
    return {
        "lp": lp.gather(-1, torch.tensor(resp)[:, None])[:, 0].numpy(),  # [T]
        "ent": -(lp.exp() * lp).sum(-1).numpy(),  # [T]
        "topk_ids": top.indices.numpy().astype(np.int32),  # [T, K]
        "topk_lp": top.values.numpy(),  # [T, K]
        "logmass": torch.logsumexp(top.values, -1).clamp(max=0.0).numpy(),  # [T]
    }


def _write(
    directory: Path, table_mod, shards: list[list[dict]], config: dict, stage: str, extra=None
):
    with store.open_writer(directory, table_mod, dataset_id=f"test-{stage}", stage=stage) as w:
        for s, rows in enumerate(shards):
            w.write_shard(s, pa.Table.from_pylist(rows, schema=table_mod.SCHEMA))
        assert w.commit(len(shards), config=config, fingerprints={}, inputs={}, extra=extra or {})


def build_run(run_dir: Path, student: Path, teacher: Path, *, n_prompts: int = 6, n: int = 2):
    """Rollouts (2 shards), tokens, selected/{all,entropy_half}, 2 metrics logs, eval results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    s_model = AutoModelForCausalLM.from_pretrained(student).eval()
    t_model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    prompts = pq.read_table(write_prompts(run_dir.parent / "prompts.parquet", n_prompts))
    config = as_dict(
        compose("rollout", [f"run_dir={run_dir}", f"student.path={student}", f"rollout.n={n}"])
    )
    torch.manual_seed(0)
    roll_shards: list[list[dict]] = [[], []]
    tok_shards: list[list[dict]] = [[], []]
    for i, p in enumerate(prompts.to_pylist()):
        guided = i % 3 == 0
        train_ids = tok(p["prompt"])["input_ids"]
        ctx_ids = tok(f"{p['context']} {p['prompt']}")["input_ids"]
        roll_ids = ctx_ids if guided else train_ids
        gen = s_model.generate(
            input_ids=torch.tensor([roll_ids] * n),
            do_sample=True,
            max_new_tokens=10,
            min_new_tokens=3,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[:, len(roll_ids) :].tolist()
        shard = i * 2 // n_prompts
        for j, resp in enumerate(gen):
            if tok.eos_token_id in resp:
                resp = resp[: resp.index(tok.eos_token_id) + 1]
            sid = f"{p['id']}-{j}"
            b, t = _score(s_model, roll_ids, resp, K), _score(t_model, ctx_ids, resp, K)
            roll_shards[shard].append(
                {
                    "sample_id": sid,
                    "prompt_id": p["id"],
                    "sample_idx": j,
                    "train_prompt_ids": train_ids,
                    "rollout_prompt_ids": roll_ids,
                    "teacher_prompt_ids": ctx_ids,
                    "response_ids": resp,
                    "behavior_logprobs": b["lp"].tolist(),
                    "response_len": len(resp),
                    "is_guided": guided,
                    "finish_reason": "eos" if resp[-1] == tok.eos_token_id else "length",
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "answer": p["answer"],
                    "kind": p["kind"],
                    "correct": p["answer"] in tok.decode(resp),
                }
            )
            for pos in range(len(resp)):
                tok_shards[shard].append(
                    {
                        "sample_id": sid,
                        "pos": pos,
                        "token_id": resp[pos],
                        "segment": 0,
                        "is_guided": guided,
                        "teacher_logprob": float(t["lp"][pos]),
                        "teacher_topk_ids": t["topk_ids"][pos].tolist(),
                        "teacher_topk_logprobs": t["topk_lp"][pos].tolist(),
                        "teacher_topk_logmass": float(t["logmass"][pos]),
                        "teacher_entropy": float(t["ent"][pos]),
                        "behavior_logprob": float(b["lp"][pos]),
                        "behavior_entropy": float(b["ent"][pos]),
                    }
                )
    _write(
        run_dir / "rollouts",
        rollouts_schema,
        roll_shards,
        config,
        "rollout",
        {"policy_path": str(student)},
    )
    _write(run_dir / "tokens", tokens_schema, tok_shards, config, "score")

    toks = [r for s in tok_shards for r in s]
    median_h = float(np.median([r["behavior_entropy"] for r in toks]))
    for name, keep in (
        ("all", lambda r: 1.0),
        ("entropy_half", lambda r: float(r["behavior_entropy"] >= median_h)),
    ):
        rows = []
        for r in (r for s in roll_shards for r in s):
            tr = [x for x in toks if x["sample_id"] == r["sample_id"]]
            w = [keep(x) for x in tr]
            rows.append(
                {
                    "sample_id": r["sample_id"],
                    "prompt_id": r["prompt_id"],
                    "is_guided": r["is_guided"],
                    "train_prompt_ids": r["train_prompt_ids"],
                    "response_ids": r["response_ids"],
                    "response_len": r["response_len"],
                    "n_kept": int(sum(x > 0 for x in w)),
                    "weights": w,
                    "segments": [0] * len(tr),
                    "teacher_logprob": [x["teacher_logprob"] for x in tr],
                    "behavior_logprob": [x["behavior_logprob"] for x in tr],
                    "ref_logprob": None,
                    "topk_k": K,
                    "teacher_topk_ids": [i for x in tr for i in x["teacher_topk_ids"]],
                    "teacher_topk_logprobs": [v for x in tr for v in x["teacher_topk_logprobs"]],
                    "teacher_topk_logmass": [x["teacher_topk_logmass"] for x in tr],
                    "behavior_topk_k": 0,
                    "behavior_topk_ids": None,
                    "teacher_logprobs_on_behavior_topk": None,
                }
            )
        sel_config = json.loads(json.dumps(config)) | {"stage": "select"}
        sel_config["select"]["name"] = name
        if name == "entropy_half":
            rule = {"policy": "entropy", "params": {"rho": 0.5, "mode": "top"}}
            sel_config["select"]["rules"] = [rule]
        _write(run_dir / "selected" / name, selected_schema, [rows], sel_config, "select")

    for name, scale in (("opd_k1-all", 1.0), ("vopd-entropy_half", 0.7)):
        d = run_dir / "train" / name
        d.mkdir(parents=True)
        lines = [
            json.dumps(
                {
                    "step": s,
                    "loss": scale * 2.0 / (1 + s),
                    "reward": -scale / (1 + s),
                    "staleness": 0.01 * s,
                    "kept_fraction": 0.5 + 0.1 * scale,
                    "lr": 1e-4,
                }
            )
            for s in range(0, 50, 5)
        ]
        # a killed run leaves a truncated last line: the report skips it with a note
        (d / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 55, "lo')
        (d / "config.json").write_text(json.dumps(config | {"stage": "train"}))
    (run_dir / "eval").mkdir()
    results = {
        "base": {
            "a": {"accuracy": 0.25, "n": 8, "correct": 2},
            "b": {"accuracy": 0.5, "n": 8, "correct": 4},
            "rkl_to_teacher": 0.81,
        },
        "opd_k1-all": {
            "a": {"accuracy": 0.625, "n": 8, "correct": 5},
            "b": {"accuracy": 0.5, "n": 8, "correct": 4},
            "rkl_to_teacher": 0.33,
        },
    }
    (run_dir / "eval" / "results.json").write_text(
        json.dumps({"results": results, "sets": ["a", "b"]})
    )
    return {"rollouts": [r for s in roll_shards for r in s], "tokens": toks, "median_h": median_h}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_lm, tiny_teacher):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    info = build_run(run_dir, tiny_lm, tiny_teacher)
    paths = report.run(compose("report", [f"run_dir={run_dir}", "select=entropy_half"]))
    return run_dir, paths, info


def _blob(doc: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', doc, re.S)
    assert m, "no data blob in report.html"
    return json.loads(m.group(1))


def _png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()  # a truncated or invalid PNG raises here
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _n_colours(px: np.ndarray) -> int:
    packed = px.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)  # [H, W]
    return len(np.unique(packed))


# ----------------------------------------------------------------------------- tests
def test_report_writes_valid_plots(full_run):
    run_dir, paths, _ = full_run
    plots = {"training_curves", "entropy_divergence", "kept_by_position", "eval_accuracy"}
    assert set(paths) == plots | {"html"}
    for name in plots:
        p = Path(paths[name])
        assert p.parent == run_dir / "report" and p.suffix == ".png"
        px = _png_pixels(p)
        assert px.shape[0] > 200 and px.shape[1] > 300
        assert px.std() > 10 and _n_colours(px) > 20, f"{name} blank"
    assert not list(run_dir.glob(".report-*")), "temporary report dirs left behind"


def test_report_html_is_self_contained(full_run):
    run_dir, paths, _ = full_run
    doc = Path(paths["html"]).read_text()
    assert "http://" not in doc and "https://" not in doc
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", doc)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs[:3]
    assert "<link" not in doc and not re.search(r"<script[^>]+src=", doc)
    assert doc.count("data:image/png;base64,") == 4
    # the results table, the selections and the resolved config are on the page
    assert "62.5%" in doc and "0.3300" in doc and "entropy_half" in doc
    assert "max_new_tokens" in doc  # from the rollouts manifest's resolved config
    assert "train/opd_k1-all</b> — training run config" in doc
    assert "metrics.jsonl: skipped 1 unreadable line" in doc


def test_report_browser_data_matches_the_shards(full_run, tiny_lm):
    from transformers import AutoTokenizer

    run_dir, paths, info = full_run
    blob = _blob(Path(paths["html"]).read_text())
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert blob["total"] == blob["shown"] == len(info["rollouts"]) == 12
    assert blob["decoded"] and blob["selections"] == ["all", "entropy_half"]
    by_sid = {r["sample_id"]: r for r in info["rollouts"]}
    toks = {(t["sample_id"], t["pos"]): t for t in info["tokens"]}
    for r in blob["rollouts"]:
        src = by_sid[r["sid"]]
        assert r["ids"] == src["response_ids"] and r["guided"] == src["is_guided"]
        assert r["prompt"] == tok.decode(src["train_prompt_ids"])
        for i, tid in enumerate(r["ids"]):
            assert blob["vocab"][str(tid)] == tok.decode([tid])
            t = toks[(r["sid"], i)]
            assert r["gap"][i] == pytest.approx(
                t["teacher_logprob"] - t["behavior_logprob"], abs=2e-3
            )
            assert r["topk"][i][0] == t["teacher_topk_ids"]
            # fp16 storage of the top-K log-probs: ~1e-3 relative
            np.testing.assert_allclose(
                r["topk"][i][1], np.exp(t["teacher_topk_logprobs"]), rtol=5e-3, atol=1e-4
            )
            assert r["w"]["entropy_half"][i] == float(t["behavior_entropy"] >= info["median_h"])
            assert all(str(x) in blob["vocab"] for x in r["topk"][i][0])


@pytest.mark.parametrize("divergence", ["rkl", "abs"])
def test_entropy_divergence_histogram_counts_the_q3_quadrant(full_run, divergence):
    """Counts, thresholds and the Q3 count agree with numpy on the same tokens (tip_q3's rule)."""
    run_dir, _, info = full_run
    data = report.open_run(RunLayout.of(run_dir))
    con = data.rv.con
    q3 = {"entropy_quantile": 0.5, "divergence_quantile": 0.8, "divergence": divergence}
    hist = report.entropy_gap_hist(con, q3, bins=20)
    h = np.array([np.float16(t["behavior_entropy"]) for t in info["tokens"]], dtype=np.float64)
    g = np.array([np.float32(t["teacher_logprob"]) - np.float32(t["behavior_logprob"])
                  for t in info["tokens"]], dtype=np.float64)  # fmt: skip
    d = np.abs(g) if divergence == "abs" else -g
    keep = (h < np.quantile(h, 0.5)) & (d >= np.quantile(d, 0.8))
    assert hist.counts.shape == (20, 20) and hist.counts.sum() == hist.n_tokens == len(h)
    assert hist.h_threshold == pytest.approx(np.quantile(h, 0.5), abs=1e-6)
    assert hist.n_q3 == keep.sum() > 0


def test_sample_indices_are_seeded_and_distinct():
    a, b, c = (browser.sample_indices(1000, 50, seed) for seed in (0, 0, 1))
    assert len(set(a.tolist())) == 50 and (np.diff(a) > 0).all() and a.max() < 1000
    assert (a == b).all() and not (a == c).all()
    assert browser.sample_indices(7, 50, 0).tolist() == list(range(7))


def test_report_shows_a_sample_of_a_large_run(full_run, tmp_path):
    src, _, _ = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    cfg = compose("report", [f"run_dir={run_dir}", "report.max_rollouts=5", "report.show_topk=3"])
    doc = Path(report.run(cfg)["html"]).read_text()
    blob = _blob(doc)
    sids = [r["sid"] for r in blob["rollouts"]]
    assert blob["shown"] == 5 and blob["total"] == 12 and len(set(sids)) == 5
    everyone = sorted(r["sample_id"] for r in full_run[2]["rollouts"])
    assert sids == [everyone[i] for i in browser.sample_indices(12, 5, 0)]
    assert all(len(t[0]) == len(t[1]) == 3 for r in blob["rollouts"] for t in r["topk"])


def test_report_partial_run_and_missing_tokenizer(full_run, tmp_path):
    """Only rollouts (+ an incomplete tokens dir), tokenizer gone: a page with notes and ids."""
    src, _, info = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(src / "rollouts", run_dir / "rollouts")
    shutil.copytree(src / "tokens", run_dir / "tokens")
    (run_dir / "tokens" / manifest.FILENAME).unlink()  # score was killed before committing
    mpath = run_dir / "rollouts" / manifest.FILENAME
    m = json.loads(mpath.read_text())
    m["extra"]["policy_path"] = str(tmp_path / "gone")
    m["config"]["student"]["path"] = str(tmp_path / "gone")
    mpath.write_text(json.dumps(manifest.seal(m)))  # re-sealed: a legitimate edit
    paths = report.run(compose("report", [f"run_dir={run_dir}"]))
    assert set(paths) == {"html"}
    doc = Path(paths["html"]).read_text()
    assert "tokens: incomplete (no manifest yet)" in doc
    assert "no train/*/metrics.jsonl yet" in doc and "no eval/results.json yet" in doc
    blob = _blob(doc)
    assert not blob["decoded"] and blob["vocab"] == {} and not blob["has_tokens"]
    assert blob["rollouts"][0]["prompt"] == " ".join(
        map(
            str,
            next(r for r in info["rollouts"] if r["sample_id"] == blob["rollouts"][0]["sid"])[
                "train_prompt_ids"
            ],
        )
    )
    assert blob["rollouts"][0]["topk"][0] is None and blob["rollouts"][0]["tlp"][0] is None


def test_report_without_rollouts_is_a_user_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="no committed rollouts"):
        report.run(compose("report", [f"run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run" / "report").exists()
    assert not list((tmp_path / "run").iterdir())
    # the CLI: one readable line, exit status 2
    p = subprocess.run(
        [sys.executable, "-m", "stages.report", f"run_dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.startswith("error: no committed rollouts"), p.stderr


def test_failed_report_keeps_the_previous_one(full_run, tmp_path):
    src, _, _ = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    before = (run_dir / "report" / "report.html").read_bytes()
    (run_dir / "eval" / "results.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        report.run(compose("report", [f"run_dir={run_dir}"]))
    assert (run_dir / "report" / "report.html").read_bytes() == before
    assert not list(run_dir.glob(".report-*"))


def test_concurrent_reports_keep_each_others_temp(full_run, tmp_path):
    """Two reports at once both finish; a stale temp of a dead process is removed, a live
    process' temp is left alone (#16: reports deleted each other's temp)."""
    src, _, _ = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (run_dir / f".report-tmp-{dead}").mkdir()
    live = run_dir / f".report-tmp-{os.getpid()}"  # this test process: alive
    live.mkdir()
    (live / "marker").write_text("mine")
    cmd = [sys.executable, "-m", "stages.report", f"run_dir={run_dir}"]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip().splitlines()[-1].endswith(f"file(s) to {run_dir / 'report'}")
    assert (live / "marker").read_text() == "mine"
    assert sorted(d.name for d in run_dir.glob(".report-*")) == [live.name]
    assert _blob((run_dir / "report" / "report.html").read_text())["rollouts"]


# ----------------------------------------------------------------------------- headless Chromium
@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        p = subprocess.run(
            ["bash", str(REPO / "scripts" / "install_chromium.sh")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if not Path("/usr/bin/chromium").exists():
            pytest.skip(
                "chromium is not installed and `apt-get install -y chromium` failed "
                f"(scripts/install_chromium.sh exit {p.returncode}: {p.stderr.strip()[-300:]})"
            )
        exe = "/usr/bin/chromium"
    return exe


def _chromium(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_report_page_in_headless_chromium(full_run, chromium, tmp_path):
    run_dir, paths, _ = full_run
    url = Path(paths["html"]).resolve().as_uri()
    p = _chromium(chromium, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url + "#selftest")
    m = re.search(r'<pre id="selftest">(\{.*?\})</pre>', p.stdout, re.S)
    assert m, f"no self-test output (chromium exit {p.returncode}): {p.stderr[-500:]}"
    st = json.loads(html.unescape(m.group(1)))
    assert st["errors"] == []
    assert st["rollouts_rendered"] == 12 and st["tokens_rendered"] > 12 * 3
    # the switch (weight -> gap) recolours the tokens
    assert (st["mode_before"], st["mode_after"]) == ("weight", "gap")
    assert st["colours_changed"] > st["tokens_rendered"] // 2 and st["distinct_colours_after"] > 5
    # the top-k popup opens on click with show_topk rows, and closes on a click elsewhere
    assert st["popup_visible"] and st["popup_rows"] == 8 and "teacher top-8" in st["popup_text"]
    assert st["popup_closed"]
    assert (
        st["guided_filter_all_guided"] and st["guided_filter_rendered"] == st["guided_in_data"] > 0
    )
    assert st["count_text"].startswith("Showing 12 of 12 rollouts")

    shot = tmp_path / "shot.png"
    p = _chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.exists(), p.stderr[-500:]
    px = _png_pixels(shot)
    assert px.shape[:2] == (2000, 1280)
    assert px.std() > 20 and _n_colours(px) > 200, "blank screenshot"
    shutil.copy(shot, run_dir.parent / "screenshot.png")  # kept for a human to look at
