"""What the report reads: the run's manifests and views, training metrics, eval results, and the two
DuckDB aggregates it plots (entropy x gap histogram, kept fraction by position)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np

from data_schemas import manifest as manifest_mod
from stages.lib import views
from stages.lib.config import Config
from stages.lib.errors import UserError
from stages.lib.layout import METRICS, RunLayout
from stages.lib.selection.policies import Q3_PARAMS

# tip_q3.sql defaults, from the policy registry: median entropy, top 10 % divergence
Q3_DEFAULTS = {k: p.default for k, p in Q3_PARAMS.items()}


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
    rv = views.open_run(
        layout, verify_checksums=VERIFY_CHECKSUMS, read_only=True, con=views.connect(threads=2)
    )
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
    for f in sorted(RunLayout.of(run_dir).train_root.glob(f"*/{METRICS}")):
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
