"""The report's figures (matplotlib, PNG): training curves, the entropy x gap histogram, kept fraction
by position, eval accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stages.lib.reporting.data import Hist2D, KeptCurve

# metrics plotted first when present; every other numeric key follows in file order
PREFERRED_METRICS = ("loss", "reward", "rkl", "reverse_kl", "staleness", "kept_fraction")


X_KEYS = ("step", "global_step", "iteration")


MAX_PANELS = 16


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
