"""Report stage: plots and one self-contained HTML page about a run, to look at rather than read.

Reads (everything under ``run_dir``; only ``rollouts/`` is required, the rest is shown when present
and replaced by a note when not): ``rollouts/``, ``tokens/``, every ``selected/<name>/``, every
``train/<name>/metrics.jsonl``, ``eval/results.json``, and the student tokenizer (the rollouts
manifest's ``extra.policy_path``, else its ``config.student.path``, else ``student.path``) to decode
token ids; without one the page shows ids. Datasets are read only when committed (manifest present,
shard sizes and footers checked), with DuckDB over their shards.

Writes ``run_dir/report/``:
- ``training_curves.png``: every numeric key of each metrics.jsonl against step, runs overlaid;
- ``entropy_divergence.png``: 2-D histogram of behaviour entropy x (teacher - behaviour log-prob)
  over student tokens, with the TIP Q3 thresholds (``tip_q3``'s defaults: median entropy and the
  top 10 % of the divergence ``behavior_logprob - teacher_logprob``, i.e. the bottom 10 % of the
  plotted gap; a ``tip_q3`` rule in ``select.rules`` or a selection manifest overrides them);
- ``kept_by_position.png``: fraction of student tokens with weight > 0 per response position, per
  selection;
- ``eval_accuracy.png``: greedy accuracy per checkpoint and eval set;
- ``report.html``: no server, no network (inline CSS/JS, images as data URIs): the plots, the
  results table, the selections, a token browser over at most ``report.max_rollouts`` rollouts
  (seeded sample) coloured by selection weight or by teacher - student log-prob gap, with the
  teacher's top ``report.show_topk`` on hover/click, filters by prompt id / kind / guided, and the
  resolved configs from the manifests. ``report.html#selftest`` runs a browser self-test (used by
  tests/test_report.py) that writes its findings into ``<pre id="selftest">``.
The directory is built under a temporary name and swapped into place, so a killed run leaves the
previous report intact; a re-run rebuilds it (it takes seconds).

Run: ``python -m stages.report experiment=demo [report.max_rollouts=500 report.show_topk=8]``
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stages.lib import safety, store
from stages.lib.config import Config, ReportConfig
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.progress import log
from stages.lib.reporting.browser import browser_data, load_decoder
from stages.lib.reporting.data import (
    RunData,
    entropy_gap_hist,
    kept_by_position,
    open_run,
    q3_params,
    read_eval,
    read_metrics,
)
from stages.lib.reporting.figures import plot_entropy_gap, plot_eval, plot_kept, plot_training
from stages.lib.reporting.page import render_html
from stages.lib.spec import StageSpec

# ----------------------------------------------------------------------------- the stage
# report/ is swapped into place from a per-process temp folder; a stale one (its process gone) is
# removed by the next run, a live one (a concurrent report) is left alone.
TMP_PREFIX, OLD_PREFIX = ".report-tmp-", ".report-old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(layout: RunLayout) -> None:
    """Temp folders of killed report runs (never a running one's, never this process')."""
    for d in layout.root.glob(".report-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if d.name.startswith((TMP_PREFIX, OLD_PREFIX)) and pid.isdigit():
            if int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with renames, so a reader sees the old or the new report;
    concurrent reports swap one at a time (a lock beside the folder)."""
    old = final.with_name(f"{OLD_PREFIX}{os.getpid()}")
    with store.file_lock(final.with_name(".report.lock"), "report"):
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def build(cfg: Config, out: Path) -> tuple[dict[str, Path], list[str]]:
    """Write the plots and report.html into ``out``; return (name -> path, notes)."""
    data = open_run(RunLayout.of(cfg.run_dir))
    try:
        return _build(cfg, data, out)
    finally:
        data.rv.close()


def _build(cfg: Config, data: RunData, out: Path) -> tuple[dict[str, Path], list[str]]:
    notes, con, sel_views = data.notes, data.rv.con, data.sel_views
    plots: list[tuple[str, Path, str]] = []  # (key, file, caption)
    runs = read_metrics(data.run_dir, notes)
    ev = read_eval(data.run_dir, notes)
    tok = load_decoder(data, cfg, notes)
    if runs and (p := plot_training(runs, out / "training_curves.png", notes)):
        plots.append(("training_curves", p, "training curves"))
    q3 = q3_params(cfg, data)
    if data.tokens is not None:
        hist = entropy_gap_hist(con, q3)
        if hist is None:
            notes.append("no student tokens with a behaviour entropy: no entropy x divergence plot")
        else:
            p = plot_entropy_gap(hist, q3, out / "entropy_divergence.png")
            plots.append(
                ("entropy_divergence", p, "behaviour entropy x teacher-behaviour divergence")
            )
    curves = {name: kept_by_position(con, v) for name, v in sel_views.items()}
    curves = {n: c for n, c in curves.items() if c.tokens}
    if curves:
        p = plot_kept(curves, out / "kept_by_position.png")
        plots.append(("kept_by_position", p, "kept fraction by position"))
    if ev and (p := plot_eval(ev, out / "eval_accuracy.png")):
        plots.append(("eval_accuracy", p, "eval accuracy"))
    blob = browser_data(con, data, sel_views, tok, cfg)
    shown = [(p, alt) for _, p, alt in plots]
    doc = render_html(data=data, plots=shown, notes=notes, ev=ev, curves=curves, blob=blob)
    (out / "report.html").write_text(doc, encoding="utf-8")
    return {**{k: p for k, p, _ in plots}, "html": out / "report.html"}, notes


def run(cfg: Config) -> dict:
    r = cfg.report
    if r.max_rollouts < 0 or r.show_topk < 1:
        raise UserError(
            f"impossible report settings (max_rollouts={r.max_rollouts}, show_topk={r.show_topk})",
            "report",
            "use report.max_rollouts >= 0 and report.show_topk >= 1",
        )
    layout = RunLayout.of(cfg.run_dir)
    if not layout.root.is_dir():
        raise UserError(
            "run dir not found", str(layout.root), "point run_dir at a run (e.g. runs/demo)"
        )
    safety.check_output(layout.report, layout.root, "the report")
    _remove_stale(layout)
    tmp = layout.root / f"{TMP_PREFIX}{os.getpid()}"
    try:
        tmp.mkdir()
        written, notes = build(cfg, tmp)
        _swap_into_place(tmp, layout.report)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise store.disk_error(e, str(tmp)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {k: str(layout.report / p.name) for k, p in written.items()}
    for n in notes:
        log.info(f"[report] note: {n}")
    for k, p in paths.items():
        log.info(f"[report] {k}: {p}")
    log.info(f"report: wrote {len(paths)} file(s) to {layout.report}")
    return paths


SPEC = StageSpec(
    name="report",
    run=run,
    config=ReportConfig,
    uses=("select",),
    reads=("rollouts/", "tokens/", "selected/", "train/", "eval/"),
    writes=("report/",),
    dataset_id=(),
    extras=("s3",),
)

main = hydra_entry("report")(run)

if __name__ == "__main__":
    main()
