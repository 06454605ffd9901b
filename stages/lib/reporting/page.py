"""The report page: one self-contained HTML file, from the template stages/report_assets/report.html.j2
(figures inline, CSS/JS from the same folder); the tables and sections it fills are built here."""

from __future__ import annotations

import base64
import html
import json
import math
import time
from importlib import resources
from pathlib import Path

import jinja2

from stages.lib.layout import RunLayout
from stages.lib.reporting.data import KeptCurve, RunData


# ----------------------------------------------------------------------------- HTML
def _img(path: Path, alt: str) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode()
    wide = ' class="wide"' if path.stem == "training_curves" else ""  # many panels: full width
    return (
        f'<figure{wide}><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></figure>'
    )


def _json_for_script(obj) -> str:
    # inside <script>, "</" would end the element: escape every "<" (valid JSON either way)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def results_table(ev: dict | None) -> str:
    if not ev or not ev["results"]:
        return '<p class="note">No eval results yet (run <code>python -m stages.eval</code>).</p>'
    sets = ev["sets"]
    head = "".join(f"<th>{html.escape(s)}</th>" for s in sets)
    extra_keys = sorted(
        {
            k
            for r in ev["results"].values()
            for s in sets
            for k in (r.get(s) or {})
            if k.startswith("pass@")
        }
    )
    head += "".join(f"<th>{html.escape(s)} {k}</th>" for s in sets for k in extra_keys)
    body = []
    best = {
        s: max((r[s]["accuracy"] for r in ev["results"].values() if s in r), default=None)
        for s in sets
    }
    for name, r in ev["results"].items():
        cells = []
        for s in sets:
            e = r.get(s)
            if not e:
                cells.append("<td>–</td>")
                continue
            cls = ' class="best"' if e["accuracy"] == best[s] else ""
            cells.append(
                f'<td{cls}>{100 * e["accuracy"]:.1f}% <span class="dim">'
                f"({e.get('correct', '?')}/{e.get('n', '?')})</span></td>"
            )
        for s in sets:
            for k in extra_keys:
                v = (r.get(s) or {}).get(k)
                cells.append(f"<td>{100 * v:.1f}%</td>" if isinstance(v, float) else "<td>–</td>")
        kl = r.get("rkl_to_teacher")
        cells.append(
            f"<td>{kl:.4f}</td>" if isinstance(kl, float) and math.isfinite(kl) else "<td>–</td>"
        )
        body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="grid"><tr><th>checkpoint</th>{head}<th>reverse KL to teacher '
        f"(nats/token)</th></tr>{''.join(body)}</table>"
    )


def selections_table(data: RunData, curves: dict[str, KeptCurve]) -> str:
    if not curves:
        return '<p class="note">No committed selection yet (run <code>python -m stages.select</code>).</p>'
    rows = []
    for name, c in curves.items():
        rules = ((data.selections[name].get("config") or {}).get("select") or {}).get("rules")
        rule_txt = ", ".join(
            f"{r.get('policy')}{json.dumps(r.get('params')) if r.get('params') else ''}"
            for r in rules or []
        )
        rows.append(
            f'<tr><th>{html.escape(name)}</th><td class="l">{html.escape(rule_txt)}</td>'
            f"<td>{c.sequences:,}</td><td>{c.tokens:,}</td><td>{c.kept_tokens:,}</td>"
            f"<td>{100 * c.overall:.1f}%</td><td>{c.mean_weight:.3f}</td></tr>"
        )
    return (
        '<table class="grid"><tr><th>selection</th><th>rules</th><th>sequences</th>'
        "<th>student tokens</th><th>kept</th><th>kept fraction</th><th>mean weight (kept)</th>"
        f"</tr>{''.join(rows)}</table>"
    )


def train_configs(run_dir: Path) -> dict[str, dict]:
    """Training run name -> the resolved config its train stage saved (train/<name>/config.json)."""
    out = {}
    for f in sorted(RunLayout.of(run_dir).train_root.glob("*/config.json")):
        try:
            out[f.parent.name] = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue  # being rewritten by a running trainer: shown next time
    return out


def config_section(data: RunData) -> str:
    items = [("rollouts", data.rollouts), ("tokens", data.tokens)] + [
        (f"selected/{n}", m) for n, m in data.selections.items()
    ]
    parts = []
    for name, m in items:
        if m is None:
            continue
        shown = {k: m.get(k) for k in ("stage", "dataset_id", "rows", "fingerprints", "inputs")}
        shown["extra"] = m.get("extra")
        shown["config"] = m.get("config")
        parts.append(
            f"<details><summary><b>{html.escape(name)}</b> — stage {html.escape(str(m['stage']))},"
            f" {m['rows']:,} rows, dataset {html.escape(m['dataset_id'])}</summary>"
            f"<pre>{html.escape(json.dumps(shown, indent=1, default=str))}</pre></details>"
        )
    for name, c in train_configs(data.run_dir).items():
        parts.append(
            f"<details><summary><b>train/{html.escape(name)}</b> — training run config"
            f"</summary><pre>{html.escape(json.dumps(c, indent=1, default=str))}</pre></details>"
        )
    return "".join(parts)


def asset(name: str) -> str:
    """A file of the page's inline CSS/JS (stages/report_assets/), read as package data."""
    return resources.files("stages").joinpath("report_assets", name).read_text(encoding="utf-8")


def render_html(
    *,
    data: RunData,
    plots: list[tuple[Path, str]],
    notes: list[str],
    ev: dict | None,
    curves: dict[str, KeptCurve],
    blob: dict,
) -> str:
    e = html.escape
    m = data.rollouts
    n_tok = data.tokens["rows"] if data.tokens else None
    sub = (
        f"{e(str(data.run_dir))} · {m['rows']:,} rollouts"
        + (f" · {n_tok:,} scored tokens" if n_tok is not None else "")
        + f" · {len(data.selections)} selection(s) · generated {time.strftime('%Y-%m-%d %H:%M')}"
    )
    notes_html = "".join(f'<div class="note">{e(n)}</div>' for n in notes)
    figs = "".join(_img(p, alt) for p, alt in plots) or '<p class="note">No plots.</p>'
    decoded = (
        "" if blob["decoded"] else '<div class="note">No tokenizer: tokens are shown as ids.</div>'
    )
    return template("report.html.j2").render(
        name=data.run_dir.name,
        css=asset("report.css"),
        sub=sub,
        notes_html=notes_html,
        figs=figs,
        results=results_table(ev),
        selections=selections_table(data, curves),
        decoded=decoded,
        show_topk=blob["show_topk"],
        config=config_section(data),
        data_json=_json_for_script(blob),
        js=asset("report.js"),
    )


def template(name: str) -> jinja2.Template:
    """A page template of stages/report_assets/ (package data). Values are HTML already: each
    part escapes what it takes from the run (``html.escape``), the template adds no escaping but
    for the run's name (``| e``)."""
    env = jinja2.Environment(autoescape=False, keep_trailing_newline=True)
    return env.from_string(asset(name))
