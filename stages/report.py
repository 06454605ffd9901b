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

import base64
import html
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from data_schemas import manifest as manifest_mod
from stages.lib import store, views
from stages.lib.config import Config
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout

# tip_q3.sql defaults (conf/select/tip_q3.yaml): median entropy, top 10 % divergence
Q3_DEFAULTS = {"entropy_quantile": 0.5, "divergence_quantile": 0.9, "divergence": "rkl"}
# metrics plotted first when present; every other numeric key follows in file order
PREFERRED_METRICS = ("loss", "reward", "rkl", "reverse_kl", "staleness", "kept_fraction")
X_KEYS = ("step", "global_step", "iteration")
MAX_PANELS = 16
PAGE_SIZE = 40  # rollouts rendered per "show more" in the browser
# The report only reads: shard sizes and footers (dataset ids) are checked, but hashing every byte
# of a multi-GB token table would dominate its run time; the training stages verify checksums.
VERIFY_CHECKSUMS = False


# ----------------------------------------------------------------------------- inputs
@dataclass
class RunData:
    """The committed datasets of a run (manifests), its DuckDB views and notes about what is
    missing."""

    layout: RunLayout
    rollouts: dict
    rv: views.RunViews
    tokens: dict | None = None
    selections: dict[str, dict] = field(default_factory=dict)  # name -> manifest
    notes: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    @property
    def sel_views(self) -> dict[str, str]:
        """selection name -> its (quoted) view."""
        return {n: self.rv.views[f"selected/{n}"] for n in self.selections}


def open_run(layout: RunLayout) -> RunData:
    """The run's views (stages.lib.views); committed rollouts are required, the rest optional."""
    if manifest_mod.path_of(layout.rollouts) is None:
        partial = any(layout.rollouts.glob("bucket=*/shard-*.parquet"))
        raise UserError(
            "no committed rollouts in the run dir: nothing to report"
            + (" (rollouts are incomplete)" if partial else ""),
            str(layout.rollouts),
            "run `python -m stages.rollout` (or the pipeline) for this run_dir first, or point "
            "run_dir at an existing run",
        )
    rv = views.open_run(layout, verify_checksums=VERIFY_CHECKSUMS, con=views.connect(threads=2))
    rollouts = rv.manifests["rollouts"]
    if rollouts["rows"] == 0:
        rv.close()
        raise UserError(
            "the rollouts dataset is empty: nothing to report",
            str(layout.rollouts),
            "check data.prompts (and data.max_prompts) and re-run the rollout stage",
        )
    notes = [n + " to the report" for n in rv.notes]
    data = RunData(layout=layout, rollouts=rollouts, rv=rv, notes=notes)
    data.tokens = rv.manifests.get("tokens")
    data.selections = dict(rv.selections)
    if not data.selections:
        data.notes.append("no committed selection under selected/: no kept-fraction plot")
    return data


def read_metrics(run_dir: Path, notes: list[str]) -> dict[str, list[dict]]:
    """Training run name -> its metrics.jsonl records (bad lines skipped with a note)."""
    runs: dict[str, list[dict]] = {}
    for f in sorted(RunLayout.of(run_dir).train_root.glob("*/metrics.jsonl")):
        recs, bad = [], 0
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1  # e.g. the last line of a killed run
                continue
            if isinstance(rec, dict):
                recs.append(rec)
        if bad:
            notes.append(f"{f.relative_to(run_dir)}: skipped {bad} unreadable line(s)")
        if recs:
            runs[f.parent.name] = recs
    if not runs:
        notes.append("no train/*/metrics.jsonl yet: no training curves")
    return runs


def read_eval(run_dir: Path, notes: list[str]) -> dict | None:
    path = RunLayout.of(run_dir).eval_results
    if not path.exists():
        notes.append("no eval/results.json yet: no accuracy plot or results table")
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(
            f"eval results are not valid JSON ({e})", str(path), "re-run python -m stages.eval"
        ) from None
    results = doc.get("results") or {}
    sets = doc.get("sets") or sorted(
        {k for r in results.values() for k, v in r.items() if isinstance(v, dict)}
    )
    return {"results": results, "sets": list(sets)}


def q3_params(cfg: Config, data: RunData) -> dict:
    """TIP Q3 quantiles: a tip_q3 rule of this config or of a selection, else the defaults."""
    rules = [r.__dict__ for r in cfg.select.rules]
    for m in data.selections.values():
        rules += ((m.get("config") or {}).get("select") or {}).get("rules") or []
    for r in rules:
        if r.get("policy") == "tip_q3":
            return Q3_DEFAULTS | {
                k: v for k, v in (r.get("params") or {}).items() if k in Q3_DEFAULTS
            }
    return dict(Q3_DEFAULTS)


# ----------------------------------------------------------------------------- numbers (SQL)
@dataclass
class Hist2D:
    counts: np.ndarray  # [n_gap_bins, n_entropy_bins]
    h_edges: np.ndarray
    g_edges: np.ndarray
    h_threshold: float  # entropy quantile
    g_threshold: float  # Q3 is gap <= this (divergence rkl), or |gap| >= this (divergence abs)
    abs_mode: bool
    n_tokens: int
    n_q3: int


def entropy_gap_hist(con: duckdb.DuckDBPyConnection, q3: dict, bins: int = 60) -> Hist2D | None:
    """2-D histogram of behaviour entropy x (teacher - behaviour log-prob), student tokens only.

    Computed in DuckDB (bins by GROUP BY), so it scales to token tables that do not fit in memory.
    Outliers beyond the 0.1/99.9 % gap quantiles land in the edge bins.
    """
    base = (
        "SELECT behavior_entropy::DOUBLE AS h, (teacher_logprob - behavior_logprob)::DOUBLE AS g "
        "FROM tokens WHERE segment = 0 AND behavior_entropy IS NOT NULL"
    )
    # tip_q3 keeps D >= quantile(D, q). rkl: D = b - t = -g, i.e. g <= quantile(g, 1 - q);
    # abs: D = |g|, i.e. |g| >= quantile(|g|, q)
    abs_mode = q3["divergence"] == "abs"
    n, hq, gq_rkl, gq_abs, hlo, hhi, glo, ghi = con.execute(
        f"SELECT count(*), quantile_cont(h, $eq), quantile_cont(g, 1 - $dq), "
        f"quantile_cont(abs(g), $dq), min(h), max(h), "
        f"quantile_cont(g, 0.001), quantile_cont(g, 0.999) FROM ({base})",
        {"eq": float(q3["entropy_quantile"]), "dq": float(q3["divergence_quantile"])},
    ).fetchone()
    if not n:
        return None
    gq = float(gq_abs if abs_mode else gq_rkl)
    hpad = 0.03 * max(float(hhi) - float(hlo), 1e-3)
    h_lo, h_hi = max(float(hlo) - hpad, 0.0), float(hhi) + hpad
    g_lo = min(float(glo), -gq if abs_mode else gq, 0.0)
    g_hi = max(float(ghi), gq if abs_mode else 0.0, 0.0)
    pad = 0.02 * max(g_hi - g_lo, 1e-3)
    g_lo, g_hi = g_lo - pad, g_hi + pad
    rows = con.execute(
        f"SELECT least(greatest(floor((h - $h0) / $hw), 0), $nb - 1)::INT AS i, "
        f"least(greatest(floor((g - $g0) / $gw), 0), $nb - 1)::INT AS j, count(*) AS c, "
        f"count(*) FILTER (WHERE h < $hq AND CASE WHEN $abs THEN abs(g) >= $gq "
        f"ELSE g <= $gq END) AS q3 "
        f"FROM ({base}) GROUP BY ALL",
        {
            "h0": h_lo,
            "hw": (h_hi - h_lo) / bins,
            "g0": g_lo,
            "gw": (g_hi - g_lo) / bins,
            "nb": bins,
            "hq": float(hq),
            "gq": gq,
            "abs": abs_mode,
        },
    ).fetchall()
    counts = np.zeros((bins, bins), dtype=np.int64)  # [gap bins, entropy bins]
    n_q3 = 0
    for i, j, c, q in rows:
        counts[j, i] += c
        n_q3 += q
    return Hist2D(
        counts=counts,
        h_edges=np.linspace(h_lo, h_hi, bins + 1),
        g_edges=np.linspace(g_lo, g_hi, bins + 1),
        h_threshold=float(hq),
        g_threshold=gq,
        abs_mode=abs_mode,
        n_tokens=int(n),
        n_q3=int(n_q3),
    )


@dataclass
class KeptCurve:
    pos: np.ndarray  # [P] response positions with at least one student token
    kept: np.ndarray  # [P] fraction of student tokens with weight > 0
    n: np.ndarray  # [P] student tokens at the position
    overall: float  # kept tokens / student tokens
    sequences: int
    tokens: int
    kept_tokens: int
    mean_weight: float  # over kept tokens


def kept_by_position(con: duckdb.DuckDBPyConnection, view: str) -> KeptCurve:
    rows = con.execute(
        f"SELECT pos, count(*) AS n, avg((w > 0)::INT) AS kept, sum((w > 0)::INT) AS k, "
        f"sum(w) AS ws FROM (SELECT unnest(weights) AS w, unnest(segments) AS s, "
        f"unnest(range(response_len)) AS pos FROM {view}) WHERE s = 0 GROUP BY pos ORDER BY pos"
    ).fetchall()
    seqs = con.execute(f"SELECT count(*) FROM {view}").fetchone()[0]
    arr = np.array(rows, dtype=np.float64).reshape(-1, 5)  # [P, (pos, n, kept, k, wsum)]
    tokens, kept_tokens = int(arr[:, 1].sum()), int(arr[:, 3].sum())
    return KeptCurve(
        pos=arr[:, 0].astype(int),
        kept=arr[:, 2],
        n=arr[:, 1].astype(int),
        overall=kept_tokens / tokens if tokens else 0.0,
        sequences=int(seqs),
        tokens=tokens,
        kept_tokens=kept_tokens,
        mean_weight=float(arr[:, 4].sum() / kept_tokens) if kept_tokens else 0.0,
    )


# ----------------------------------------------------------------------------- plots
def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas by default

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=100)
    return path


def metric_keys(runs: dict[str, list[dict]]) -> tuple[str | None, list[str]]:
    """The x key (step) and the numeric metric keys to plot, preferred ones first."""
    keys: list[str] = []
    for recs in runs.values():
        for r in recs:
            for k, v in r.items():
                if k not in keys and isinstance(v, int | float) and not isinstance(v, bool):
                    keys.append(k)
    x = next((k for k in X_KEYS if k in keys), None)
    keys = [k for k in keys if k != x]
    first = [k for p in PREFERRED_METRICS for k in keys if k == p]
    first += [k for k in keys if k not in first and any(p in k for p in PREFERRED_METRICS)]
    return x, first + [k for k in keys if k not in first]


def plot_training(runs: dict[str, list[dict]], path: Path, notes: list[str]) -> Path | None:
    x_key, keys = metric_keys(runs)
    if not keys:
        notes.append("metrics.jsonl files have no numeric keys: no training curves")
        return None
    if len(keys) > MAX_PANELS:
        notes.append(f"training curves: showing {MAX_PANELS} of {len(keys)} metrics")
        keys = keys[:MAX_PANELS]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(4.2 * cols, 2.8 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, keys, strict=False):
        for (name, recs), c in zip(runs.items(), colours, strict=True):
            pts = [
                (r.get(x_key, i) if x_key else i, r[key])
                for i, r in enumerate(recs)
                if isinstance(r.get(key), int | float) and math.isfinite(r[key])
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, color=c, label=name, lw=1.4, marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(x_key or "record", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=min(4, len(runs)), fontsize=9)
    return _save(fig, path)


def plot_entropy_gap(hist: Hist2D, q3: dict, path: Path) -> Path:
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import NullFormatter

    fig = _figure(7.0, 5.0)
    ax = fig.subplots()
    counts = np.ma.masked_equal(hist.counts, 0)
    mesh = ax.pcolormesh(
        hist.h_edges,
        hist.g_edges,
        counts,
        cmap="viridis",
        norm=LogNorm(vmin=1, vmax=max(int(hist.counts.max()), 2)),
    )
    cb = fig.colorbar(mesh, ax=ax, label="tokens per bin", format="%g")
    cb.ax.yaxis.set_minor_formatter(NullFormatter())
    h0, h1 = hist.h_edges[0], hist.h_threshold
    g0, g1, t = hist.g_edges[0], hist.g_edges[-1], hist.g_threshold
    # the Q3 region (low entropy, high divergence), shaded
    spans = [(-t, g0), (t, g1)] if hist.abs_mode else [(t, g0)]
    for edge, end in spans:
        ax.add_patch(
            Rectangle((h0, min(edge, end)), h1 - h0, abs(end - edge), fc="tab:red", alpha=0.15)
        )
        ax.axhline(edge, color="tab:red", ls="--", lw=1.2)
    ax.axvline(hist.h_threshold, color="tab:red", ls="--", lw=1.2)
    ax.axhline(0.0, color="0.5", lw=0.6)
    eq, dq = q3["entropy_quantile"], q3["divergence_quantile"]
    ax.text(
        h0 + 0.02 * (hist.h_edges[-1] - h0),
        g0 + 0.03 * (g1 - g0),
        f"Q3 (overconfident & wrong): {hist.n_q3:,} tokens "
        f"({100 * hist.n_q3 / hist.n_tokens:.1f}%)",
        color="tab:red",
        fontsize=8,
    )
    ax.set_xlabel(f"behaviour entropy H_b (nats); dashed: {eq:g} quantile = {h1:.3g}")
    ax.set_ylabel("teacher − behaviour log-prob (nats)")
    rule = f"|gap| ≥ {t:.3g}" if hist.abs_mode else f"gap ≤ {t:.3g}"
    ax.set_title(
        f"{hist.n_tokens:,} student tokens; dashed: divergence ({q3['divergence']}) top "
        f"{100 * (1 - dq):.3g}% ({rule})",
        fontsize=9,
    )
    return _save(fig, path)


def plot_kept(curves: dict[str, KeptCurve], path: Path) -> Path:
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    twin = ax.twinx()
    ref = max(curves.values(), key=lambda c: len(c.pos))
    twin.fill_between(ref.pos, ref.n, step="mid", color="0.85", zorder=0)
    twin.set_ylabel("student tokens at position", color="0.5", fontsize=8)
    twin.tick_params(labelsize=8, colors="0.5")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(
            c.pos,
            c.kept,
            color=f"C{i % 10}",
            lw=1.5,
            marker="." if len(c.pos) < 60 else None,
            label=f"{name} ({100 * c.overall:.1f}% kept)",
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("response position")
    ax.set_ylabel("fraction of tokens kept (weight > 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_eval(ev: dict, path: Path) -> Path | None:
    names = list(ev["results"])
    sets = [s for s in ev["sets"] if any(s in r for r in ev["results"].values())]
    if not names or not sets:
        return None
    fig = _figure(max(5.0, 1.1 * len(names) * len(sets) + 2), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(sets)
    xs = np.arange(len(names))
    for j, s in enumerate(sets):
        acc = [100 * ev["results"][n].get(s, {}).get("accuracy", float("nan")) for n in names]
        bars = ax.bar(xs + (j - (len(sets) - 1) / 2) * width, acc, width, label=s, color=f"C{j}")
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax.set_xticks(xs, names, rotation=20 if len(names) > 4 else 0, fontsize=9)
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, title="eval set", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------- token browser data
def load_decoder(data: RunData, cfg: Config, notes: list[str]):
    """The student tokenizer (the policy that sampled), or None: the browser then shows ids."""
    from stages.lib import models

    cands = [
        store.model_path(data.rollouts, "policy", "policy_path", data.layout.rollouts),
        ((data.rollouts.get("config") or {}).get("student") or {}).get("path"),
        cfg.student.path,
    ]
    for p in cands:
        if p and Path(p).is_dir():
            try:
                return models.load_tokenizer(p, "student")
            except UserError:
                continue
    notes.append(
        "no student tokenizer found (rollouts manifest extra.policy_path / config.student.path): "
        "the token browser shows token ids"
    )
    return None


def decode_vocab(tok, ids: set[int]) -> dict[str, str]:
    """id -> its text as one token (byte-level pieces that decode to U+FFFD keep the raw token)."""
    if tok is None:
        return {}
    out = {}
    for i in sorted(ids):
        s = tok.decode([i], skip_special_tokens=False)
        if not s or "\ufffd" in s:
            s = tok.convert_ids_to_tokens(i) or str(i)
        out[str(i)] = s
    return out


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def sample_indices(total: int, k: int, seed: int) -> np.ndarray:
    """``min(k, total)`` distinct indices of ``range(total)``, seeded, in ascending order."""
    k = min(k, total)
    return np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))


def _chosen_rows(con: duckdb.DuckDBPyConnection, cfg: Config) -> tuple[int, list[dict]]:
    """(total rollouts, the seeded sample's rollouts rows); registers the sample as ``chosen``."""
    all_ids = [
        r[0]
        for r in con.execute(
            "SELECT sample_id FROM rollouts ORDER BY prompt_id, sample_idx, sample_id"
        ).fetchall()
    ]
    total = len(all_ids)
    chosen = [all_ids[i] for i in sample_indices(total, cfg.report.max_rollouts, cfg.seed)]
    con.register("chosen", pa.table({"sample_id": chosen, "ord": list(range(len(chosen)))}))
    rows = con.sql(
        "SELECT r.sample_id, prompt_id, kind, is_guided, finish_reason, correct, answer, "
        "train_prompt_ids, rollout_prompt_ids, response_ids, behavior_logprobs "
        "FROM rollouts r JOIN chosen USING (sample_id) ORDER BY ord"
    )
    return total, rows.to_arrow_table().to_pylist()


def _token_stats(con: duckdb.DuckDBPyConnection, k: int) -> dict[str, dict]:
    """sample_id -> its tokens' values as lists in position order (the chosen sample only)."""
    rel = con.sql(
        "SELECT sample_id, list(pos ORDER BY pos) AS pos, "
        "list(segment ORDER BY pos) AS seg, list(teacher_logprob ORDER BY pos) AS tlp, "
        "list(behavior_logprob ORDER BY pos) AS blp, "
        "list(behavior_entropy::FLOAT ORDER BY pos) AS ent, "
        "list(teacher_entropy::FLOAT ORDER BY pos) AS tent, "
        "list(teacher_topk_logmass ORDER BY pos) AS tm, "
        f"list(teacher_topk_ids[1:{k}] ORDER BY pos) AS kid, "
        f"list(teacher_topk_logprobs[1:{k}]::FLOAT[] ORDER BY pos) AS klp "
        "FROM tokens JOIN chosen USING (sample_id) GROUP BY sample_id"
    )
    return {s["sample_id"]: s for s in rel.to_arrow_table().to_pylist()}


def _rollout_entry(r: dict, st: dict | None, w: dict[str, list], tok, vocab_ids: set[int]):
    """One rollout of the browser: per-token values (None where the tokens table has none)."""
    resp = r["response_ids"]
    t = len(resp)
    tlp, blp, ent, tent = [None] * t, list(r["behavior_logprobs"]), [None] * t, [None] * t
    seg, topk, tm = [0] * t, [None] * t, [None] * t
    for j, p in enumerate(st["pos"] if st is not None else []):
        if 0 <= p < t:
            tlp[p], blp[p], ent[p], tent[p] = (
                st["tlp"][j],
                st["blp"][j],
                st["ent"][j],
                st["tent"][j],
            )
            seg[p], tm[p] = st["seg"][j], st["tm"][j]
            ids, lps = st["kid"][j], st["klp"][j]
            topk[p] = [ids, [_r(math.exp(x), 4) for x in lps]]
            vocab_ids.update(ids)
    vocab_ids.update(resp)
    gap = [_r(a - b) if a is not None and b is not None else None for a, b in zip(tlp, blp)]
    return {
        "sid": r["sample_id"],
        "pid": r["prompt_id"],
        "kind": r["kind"],
        "guided": bool(r["is_guided"]),
        "finish": r["finish_reason"],
        "correct": r["correct"],
        "answer": r["answer"],
        "prompt": _decode_text(tok, r["train_prompt_ids"]),
        "rprompt": _decode_text(tok, r["rollout_prompt_ids"]) if r["is_guided"] else None,
        "ids": resp,
        "seg": seg,
        "tlp": [_r(x) for x in tlp],
        "blp": [_r(x) for x in blp],
        "gap": gap,
        "ent": [_r(x) for x in ent],
        "tent": [_r(x) for x in tent],
        "tm": [_r(math.exp(x), 4) if x is not None else None for x in tm],
        "topk": topk,
        "w": {n: [_r(x) for x in ws] for n, ws in w.items()},
    }


def browser_data(
    con: duckdb.DuckDBPyConnection,
    data: RunData,
    sel_views: dict[str, str],
    tok,
    cfg: Config,
) -> dict:
    """The JSON blob the page renders: a seeded sample of rollouts with per-token values."""
    k = cfg.report.show_topk
    total, rows = _chosen_rows(con, cfg)
    stats = _token_stats(con, k) if data.tokens is not None else {}
    weights: dict[str, dict[str, list]] = {name: {} for name in sel_views}
    for name, v in sel_views.items():
        for sid, w in con.execute(
            f"SELECT sample_id, weights FROM {v} JOIN chosen USING (sample_id)"
        ).fetchall():
            weights[name][sid] = w
    vocab_ids: set[int] = set()
    out, gaps, wmax = [], [], 1.0
    for r in rows:
        sid = r["sample_id"]
        w = {n: weights[n][sid] for n in sel_views if sid in weights[n]}
        wmax = max([wmax, *(max(ws, default=0.0) for ws in w.values())])
        e = _rollout_entry(r, stats.get(sid), w, tok, vocab_ids)
        gaps += [abs(g) for g, s in zip(e["gap"], e["seg"]) if g is not None and s == 0]
        out.append(e)
    # colour scale of the gap: the 95th percentile of |gap| (at least 1 nat), so a few outliers
    # do not wash the rest out
    gapscale = max(1.0, float(np.quantile(gaps, 0.95))) if gaps else 1.0
    names = list(sel_views)
    return {
        "total": total,
        "shown": len(rows),
        "seed": cfg.seed,
        "show_topk": k,
        "has_tokens": data.tokens is not None,
        "decoded": tok is not None,
        "selections": names,
        "default_selection": cfg.select.name
        if cfg.select.name in names
        else next(iter(names), None),
        "wmax": _r(wmax),
        "gapscale": _r(gapscale),
        "page": PAGE_SIZE,
        "vocab": decode_vocab(tok, vocab_ids),
        "rollouts": out,
    }


def _decode_text(tok, ids: list[int]) -> str:
    if tok is None:
        return " ".join(map(str, ids))
    return tok.decode(ids, skip_special_tokens=False)


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
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>distillery report — {e(data.run_dir.name)}</title>
<style>{asset("report.css")}</style></head>
<body>
<header><h1>distillery report — {e(data.run_dir.name)}</h1><div class="sub">{sub}</div></header>
<main>
{f'<section id="notes"><h2>Notes</h2>{notes_html}</section>' if notes else ""}
<section id="plots"><h2>Plots <span class="dim">(click one to enlarge)</span></h2><div class="plots">{figs}</div></section>
<section id="results"><h2>Eval results</h2>{results_table(ev)}</section>
<section id="selections"><h2>Selections</h2>{selections_table(data, curves)}</section>
<section id="browser"><h2>Rollouts</h2>{decoded}
<div class="controls">
 <span>colour by:
  <label><input type="radio" name="colour" id="color-weight" value="weight"> selection weight</label>
  <label><input type="radio" name="colour" id="color-gap" value="gap"> teacher − student log-prob</label>
 </span>
 <label>selection <select id="selection"></select></label>
 <label>prompt / sample id <input id="filter-prompt" type="search" placeholder="filter…" size="14"></label>
 <label>kind <select id="filter-kind"><option value="__all">all</option></select></label>
 <label>guided <select id="filter-guided"><option value="all">all</option>
  <option value="guided">guided only</option><option value="unguided">unguided only</option></select></label>
</div>
<div><span class="legend" id="legend"></span> <span id="legend-text" class="dim"></span></div>
<p id="count"></p>
<p class="dim">Hover a token for the teacher's top-{blob["show_topk"]}; click to pin it (Esc closes).
Dashed tokens are teacher-prefix segments (not student tokens).</p>
<div id="rollouts"></div><button id="show-more" type="button">show more</button>
</section>
<section id="config"><h2>Resolved configs (from the manifests)</h2>{config_section(data)}</section>
</main>
<div id="topk-popup" role="dialog"></div>
<script type="application/json" id="report-data">{_json_for_script(blob)}</script>
<script>{asset("report.js")}</script>
</body></html>
"""


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
        print(f"[report] note: {n}")
    for k, p in paths.items():
        print(f"[report] {k}: {p}")
    print(f"report: wrote {len(paths)} file(s) to {layout.report}")
    return paths


main = hydra_entry("report")(run)

if __name__ == "__main__":
    main()
