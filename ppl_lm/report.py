"""An offline HTML report comparing posteriors: ``ppl_lm.report({"IS": post, ...}, "out/report")``.

The report folder holds ``report.html`` (self-contained: figures embedded as base64 PNG, no
scripts, no network), the same figures as PNG files, ``summary.md`` (the tables and top samples
in Markdown) and ``summary.json`` (the table's numbers, unformatted).

It is written atomically: everything is built in a temporary folder beside ``out_dir`` and only
then moved into place (``report.html`` last), so a run that fails half-way leaves neither a
partial report nor stray files, and an earlier report in ``out_dir`` stays intact.

Figures are drawn on ``matplotlib.figure.Figure`` objects rendered by Agg, never through
``pyplot``: making a report changes no global matplotlib state and opens no window.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from . import diagnostics as D
from .posterior import Posterior

__all__ = ["report", "summary_rows", "FIGURES"]

log = logging.getLogger(__name__)

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
EXACT_COLOR = "#222222"
MAX_TRACE_VARS = 4


# -- numbers ------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):,}"
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "−∞" if v < 0 else "∞"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t:.2f} s" if t < 120 else f"{t / 60:.1f} min"


def _tv(post: Posterior, exact: Posterior) -> float:
    p, q = post.probabilities(), exact.probabilities()
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def summary_rows(posteriors: Mapping[str, Posterior], exact: Posterior | None = None) -> list[dict]:
    """One :func:`ppl_lm.diagnostics.summary` dict per posterior (``name`` added), exact first.

    With ``exact``, each row also has ``tv_to_exact`` (total variation between the weighted
    empirical law and the exact posterior) and ``log_evidence_error``.
    """
    rows = []
    items = ([("exact", exact)] if exact is not None else []) + list(posteriors.items())
    for name, post in items:
        row = {"name": name, **D.summary(post)}
        if exact is not None:
            row["tv_to_exact"] = _tv(post, exact)
            row["log_evidence_error"] = (None if post.log_evidence is None
                                         else post.log_evidence - exact.log_evidence)
        rows.append(row)
    return rows


def _mean_columns(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r["means"]:
            if k not in names:
                names.append(k)
    order = lambda k: (0 if k.startswith("reward:") else 1 if k.startswith("ok:") else 2, names.index(k))  # noqa: E731
    return sorted(names, key=order)


def _table(rows: list[dict], exact: bool) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the summary table (shared by HTML and Markdown)."""
    means = _mean_columns(rows)
    head = ["backend", "method", "samples", "log Z ± se", "ESS", "k-hat", "R-hat", "acceptance"]
    head += [f"E[{m}]" for m in means]
    if exact:
        head += ["TV to exact", "log Z error"]
    head += ["wall time"]
    cells = []
    for r in rows:
        lz = _fmt(r["log_evidence"], 4)
        if r["log_evidence"] is not None and r["log_evidence_se"] is not None:
            lz += f" ± {_fmt(r['log_evidence_se'], 4)}"
        samples = _fmt(r["num_samples"])
        if r["num_chains"] > 1:
            samples += f" ({r['num_chains']} chains)"
        acc = _fmt(r["acceptance"])
        if r["acceptance_moves"]:
            acc += "\n" + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in r["acceptance_moves"].items())
        row = [r["name"], r["method"], samples, lz,
               f"{_fmt(r['ess'], 1)} ({_fmt(r['ess'] / r['num_samples'], 2)})",
               _fmt(r["khat"], 2), _fmt(r["rhat"]), acc]
        row += [_fmt(r["means"].get(m)) for m in means]
        if exact:
            row += [_fmt(r["tv_to_exact"]), _fmt(r["log_evidence_error"], 4)]
        row += [_fmt_time(r["wall_time"])]
        cells.append(row)
    return head, cells


# -- figures ------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _colors(names) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _finite_weighted(post: Posterior, name: str) -> tuple[np.ndarray, np.ndarray]:
    v = post.stats[name].detach().cpu().double().numpy().reshape(-1)
    w = post.weights.detach().cpu().numpy()
    keep = (w > 0) & np.isfinite(v)
    return v[keep], w[keep] / max(w[keep].sum(), 1e-300)


def _quantities(posteriors: Mapping[str, Posterior]) -> list[str]:
    names: list[str] = []
    for post in posteriors.values():
        for k in D.stat_names(post):
            if (k.startswith("reward:") or k in ("length", "log_prior")) and k not in names:
                names.append(k)
    return sorted(names, key=lambda k: (0 if k.startswith("reward:") else 1 if k == "length" else 2, k))


def _weighted_quantiles(v: np.ndarray, w: np.ndarray, q) -> np.ndarray:
    order = np.argsort(v)
    cw = np.cumsum(w[order])
    cw = cw / cw[-1]
    idx = np.searchsorted(cw, np.asarray(q), side="left").clip(0, len(v) - 1)
    return v[order][idx]


def fig_rewards(posteriors: Mapping[str, Posterior], exact: Posterior | None = None):
    """Weighted distributions of each reward, the length and the log prior, backends side by side."""
    qs = _quantities(posteriors)
    if not qs:
        return None
    series = dict(posteriors)
    if exact is not None:
        series = {"exact": exact, **series}
    colors = _colors(posteriors)
    colors["exact"] = EXACT_COLOR
    ncols = min(3, len(qs))
    nrows = math.ceil(len(qs) / ncols)
    fig = _figure(5.2 * ncols, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, q in zip(axes, qs):
        data = {n: _finite_weighted(p, q) for n, p in series.items() if q in p.stats}
        data = {n: vw for n, vw in data.items() if len(vw[0])}
        if not data:
            ax.set_visible(False)
            continue
        pooled = np.concatenate([v for v, _ in data.values()])
        uniq = np.unique(pooled)
        if len(uniq) <= 10:
            # Few distinct values: grouped bars, one per backend, so nothing hides behind anything.
            width = 0.8 / len(data)
            pos = np.arange(len(uniq))
            for j, (n, (v, w)) in enumerate(data.items()):
                probs = np.array([w[v == u].sum() for u in uniq])
                kw = dict(color=colors[n], label=n)
                if n == "exact":
                    kw = dict(fill=False, edgecolor=EXACT_COLOR, hatch="///", label=n)
                ax.bar(pos - 0.4 + width * (j + 0.5), probs, width, **kw)
            ax.set_xticks(pos, [f"{u:.4g}" for u in uniq])
        elif len(uniq) <= 60:
            # A probability mass function: markers on the exact law's bars.
            for n, (v, w) in data.items():
                probs = np.array([w[v == u].sum() for u in uniq])
                if n == "exact":
                    ax.bar(uniq, probs, width=np.min(np.diff(uniq)) * 0.8, fill=False, edgecolor=EXACT_COLOR,
                           hatch="///", label=n)
                else:
                    ax.plot(uniq, probs, "o-", color=colors[n], lw=1, ms=4, alpha=0.85, label=n)
        else:
            # The range covers each series' central 99% of posterior mass (weighted quantiles), so
            # a far, low-weight sample does not squash every histogram into a few bins.
            qs_ = np.array([_weighted_quantiles(v, w, [0.005, 0.995]) for v, w in data.values()])
            lo, hi = qs_[:, 0].min(), qs_[:, 1].max()
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            bins = np.linspace(lo, hi, 31)
            for n, (v, w) in data.items():
                c = np.clip(v, lo, hi)
                if n == "exact":
                    ax.hist(c, bins, weights=w, histtype="step", color=EXACT_COLOR, lw=1.8, ls="--", label=n)
                else:
                    ax.hist(c, bins, weights=w, histtype="stepfilled", alpha=0.2, color=colors[n])
                    ax.hist(c, bins, weights=w, histtype="step", lw=1.6, color=colors[n], label=n)
        ax.set_title(q)
        ax.set_ylabel("posterior probability")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    for ax in axes[len(qs):]:
        ax.set_visible(False)
    return fig


def fig_weights(posteriors: Mapping[str, Posterior], exact: Posterior | None = None):
    """Sorted normalised importance weights (N·w against rank / N) and k-hat per weighted backend."""
    weighted = {n: p for n, p in posteriors.items() if not D.is_mcmc(p) and p.method != "exact"}
    if not weighted:
        return None
    colors = _colors(posteriors)
    fig = _figure(11, 3.6)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2, 1])
    for n, p in weighted.items():
        w = np.sort(p.weights.detach().cpu().numpy())[::-1] * len(p)
        x = (np.arange(len(w)) + 1) / len(w)
        pos = w > 0
        k = D.psis_khat(p)
        label = f"{n}: ESS/N {p.ess / len(p):.2f}" + ("" if k is None else f", k-hat {k:.2f}")
        ax1.step(x[pos], w[pos], where="post", color=colors[n], lw=1.6, label=label)
    ax1.axhline(1.0, color="grey", ls=":", lw=1, label="uniform weights")
    ax1.set_yscale("log")
    ax1.set_xlabel("rank / N (largest weight first)")
    ax1.set_ylabel("N · normalised weight")
    ax1.set_title("sorted importance weights")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    names = list(weighted)
    ks = [D.psis_khat(weighted[n]) for n in names]
    ess = [weighted[n].ess / len(weighted[n]) for n in names]
    pos = np.arange(len(names))
    # An infinite k-hat (too few distinct weights) is drawn at the top of the axis, labelled ∞.
    shown = [np.nan if k is None else (float(np.clip(k, -1.0, 1.5)) if math.isinf(k) else k) for k in ks]
    ax2.bar(pos - 0.2, shown, 0.4, color=[colors[n] for n in names])
    ax2.bar(pos + 0.2, ess, 0.4, color=[colors[n] for n in names], alpha=0.4, hatch="..")
    ax2.axhline(0.5, color="#b22222", ls=":", lw=1, label="k-hat 0.5 (good below)")
    ax2.axhline(0.7, color="#b22222", ls="--", lw=1, label="k-hat 0.7 (unreliable above)")
    ax2.legend(fontsize=7)
    for i, (k, y) in enumerate(zip(ks, shown)):
        ax2.text(i - 0.2, 0.02 if k is None else max(y, 0) + 0.02,
                 "n/a" if k is None else _fmt(k, 2), ha="center", fontsize=7)
    ax2.set_xticks(pos, names)
    ax2.set_title("k-hat (solid) and ESS / N (hatched)")
    ax2.grid(alpha=0.3, axis="y")
    return fig


def _trace_vars(idata) -> list[str]:
    names = list(idata.posterior.data_vars)
    pick = [n for n in names if n.startswith("reward:")] + [n for n in ("log_joint", "length") if n in names]
    pick += [n for n in names if n not in pick]
    varying = [n for n in pick if np.nanstd(np.asarray(idata.posterior[n], dtype=float)) > 0]
    return (varying or pick)[:MAX_TRACE_VARS]


def fig_mh_trace(name: str, post: Posterior):
    """Trace plot of the main scalar summaries of an MCMC run: per-chain distributions and traces.

    The layout of ``arviz.plot_trace``, drawn directly so each chain keeps one colour in both
    columns and integer-valued summaries (lengths, counts) are bars rather than smoothed densities.
    """
    idata = D.to_inference_data(post)
    names = _trace_vars(idata)
    fig = _figure(12, 2.3 * len(names))
    axes = fig.subplots(len(names), 2, squeeze=False, width_ratios=[1, 1.6])
    for (left, right), n in zip(axes, names):
        v = np.asarray(idata.posterior[n].values, dtype=float)  # [chains, draws]
        fin = v[np.isfinite(v)]
        if fin.size == 0:
            continue
        uniq = np.unique(fin)
        discrete = len(uniq) <= 25 and np.array_equal(uniq, np.round(uniq))
        if discrete:
            bins = np.arange(uniq.min() - 0.5, uniq.max() + 1.5)
        else:
            lo, hi = np.percentile(fin, [0.5, 99.5])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        for c, row in enumerate(v):
            color = PALETTE[c % len(PALETTE)]
            row_f = row[np.isfinite(row)]
            if row_f.size:
                left.hist(np.clip(row_f, bins[0], bins[-1]), bins, density=True, histtype="step", lw=1.4,
                          color=color, label=f"chain {c}")
            right.plot(np.arange(len(row)), row, color=color, lw=0.9, alpha=0.8,
                       drawstyle="steps-post" if discrete else "default")
        left.set_title(n, fontsize=10)
        left.set_yticks([])
        right.set_title(n, fontsize=10)
        right.grid(alpha=0.3)
        if discrete and len(uniq) <= 12:
            left.set_xticks(uniq)
    axes[0][0].legend(fontsize=7)
    axes[-1][1].set_xlabel("draw")
    fig.suptitle(f"{name}: trace ({post.num_chains} chains)")
    return fig


def fig_mh_rank(name: str, post: Posterior):
    """ArviZ rank plot: uniform histograms per chain mean the chains mix."""
    az = D._arviz()
    idata = D.to_inference_data(post)
    names = _trace_vars(idata)
    fig = _figure(3.6 * len(names), 3.0)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az.plot_rank(idata, var_names=names, ax=axes, show=False)
    fig.suptitle(f"{name}: rank plot")
    return fig


def _smooth(y: np.ndarray) -> np.ndarray:
    k = max(1, len(y) // 25)
    if k == 1:
        return y
    c = np.cumsum(np.insert(np.nan_to_num(y), 0, 0.0))
    out = (c[k:] - c[:-k]) / k
    return np.concatenate([np.full(k - 1, np.nan), out])


_SVI_TITLES = {"elbo": "ELBO", "reward": "E_q[r]", "kl": "KL(q ‖ prior)", "kl_prior": "KL(q ‖ prior)",
               "kl_to_posterior": "KL(q ‖ posterior)", "kl_posterior": "KL(q ‖ posterior)"}


def _svi_rank(key: str) -> int:
    if key == "elbo":
        return 0
    if key == "reward" or key.startswith("reward:"):
        return 1
    if key in ("kl", "kl_prior"):
        return 2
    if key in ("kl_to_posterior", "kl_posterior"):
        return 3
    return 4 if key.startswith("ok:") else 5


def _svi_title(key: str) -> str:
    if key.startswith("reward:"):
        return f"E_q[{key}]"
    if key.startswith("ok:"):
        return f"P_q({key})"
    return _SVI_TITLES.get(key, key)


def fig_svi(name: str, post: Posterior, exact: Posterior | None = None):
    """SVI curves: the ELBO, E_q[r], the KL terms, and any other per-step trace, against the step."""
    trace = post.info.get("trace")
    if not isinstance(trace, dict) or not trace:
        return None
    arrays = {}
    for k, v in trace.items():
        a = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=float)
        if a.ndim == 1 and a.size > 0 and k != "step":
            arrays[k] = a
    if not arrays:
        return None
    keys = sorted(arrays, key=lambda k: (_svi_rank(k), k))
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(4.6 * ncols, 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    steps_all = np.asarray(trace["step"], dtype=float) if "step" in trace else None
    for ax, k in zip(axes, keys):
        y = arrays[k]
        x = steps_all if steps_all is not None and len(steps_all) == len(y) else np.arange(len(y))
        ax.plot(x, y, color=PALETTE[0], alpha=0.35, lw=1)
        ax.plot(x, _smooth(y), color=PALETTE[0], lw=1.8, label="moving average")
        if k == "elbo":
            ref, label = (exact.log_evidence, "exact log Z") if exact is not None else (
                post.log_evidence, "log Z estimate")
            if ref is not None and math.isfinite(ref):
                ax.axhline(ref, color=EXACT_COLOR, ls="--", lw=1.2, label=label)
        title = _svi_title(k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{name}: SVI training")
    return fig


def fig_smc(name: str, post: Posterior):
    """SMC: the effective sample size per token step (before resampling), as a fraction of N."""
    hist = post.info.get("ess_history")
    if hist is None or len(hist) == 0:
        return None
    y = np.asarray(hist, dtype=float).reshape(len(hist), -1).mean(-1)
    n = float(post.info.get("num_particles") or len(post))
    fig = _figure(7, 3)
    ax = fig.subplots()
    ax.plot(np.arange(1, len(y) + 1), y / n, "o-", ms=3, color=PALETTE[0], label="ESS / N")
    thr = post.info.get("ess_threshold")
    if isinstance(thr, (int, float)):
        ax.axhline(thr, color="#b22222", ls="--", lw=1, label=f"resampling threshold {thr:g}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("token step")
    ax.set_ylabel("ESS / N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: particle ESS per step")
    return fig


def _figure_specs(posteriors, exact) -> list[tuple[str, str, str, Callable[[], Any]]]:
    """(file name, section, caption, draw) for every figure of the report, in order."""
    mod = sys.modules[__name__]  # look functions up at call time (tests replace them)
    specs = [
        ("rewards.png", "distributions", "Weighted posterior distributions of each reward, the length "
         "and the log prior (bars: discrete values; lines: histograms).",
         lambda: mod.fig_rewards(posteriors, exact)),
        ("weights.png", "weights", "Importance weights: sorted N·w (flat at 1 is ideal) and Pareto k-hat "
         "(above 0.7 the estimates are unreliable).", lambda: mod.fig_weights(posteriors, exact)),
    ]
    seen: set[str] = set()
    for i, (n, p) in enumerate(posteriors.items()):
        slug = _slug(n, i)
        if slug in seen:  # "a b" and "a_b" would share file names
            slug = f"{slug}_{i}"
        seen.add(slug)
        if D.is_mcmc(p):
            specs.append((f"trace_{slug}.png", n, f"{n}: trace plots per chain.",
                          lambda n=n, p=p: mod.fig_mh_trace(n, p)))
            specs.append((f"rank_{slug}.png", n, f"{n}: rank plots (uniform when the chains mix).",
                          lambda n=n, p=p: mod.fig_mh_rank(n, p)))
        if p.info.get("ess_history") is not None:
            specs.append((f"smc_{slug}.png", n, f"{n}: ESS / N per token step; below the threshold the "
                          "particles are resampled.", lambda n=n, p=p: mod.fig_smc(n, p)))
        if isinstance(p.info.get("trace"), dict):
            specs.append((f"svi_{slug}.png", n, f"{n}: SVI objective and its terms per step.",
                          lambda n=n, p=p: mod.fig_svi(n, p, exact)))
    return specs


def _slug(name: str, i: int) -> str:
    s = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")
    return s or f"posterior{i}"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# -- documents ----------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1250px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#666;font-size:.9em}
.desc{white-space:pre-wrap}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:.3em .6em;vertical-align:top}
th{background:#f3f3f3;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.88em}
.text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;max-width:760px;word-break:break-word}
.empty{color:#999;font-style:italic}
.nl{color:#bbb}
.note{color:#666;font-size:.88em}
.sub{color:#666;font-size:.85em;white-space:normal}
.wide{overflow-x:auto}
"""


def _html_text(text: str, limit: int) -> str:
    if text == "":
        return '<span class="empty">(empty sequence)</span>'
    short = text if len(text) <= limit else text[:limit] + "…"
    # Line breaks stay line breaks (pre-wrap) and get a visible mark, so "a\nb" and "a b" differ.
    return '<span class="nl">⏎</span>\n'.join(html.escape(line) for line in short.split("\n"))


def _md_text(text: str, limit: int) -> str:
    if text == "":
        return "*(empty)*"
    short = text if len(text) <= limit else text[:limit] + "…"
    short = short.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("\n", "⏎")
    return short.replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*").replace("_", "\\_")


def _is_num(cell: str) -> bool:
    c = cell.replace("−", "-").replace("±", "").replace(",", "").replace(" ", "")
    return bool(c) and (c[0].isdigit() or c[0] in "-.—") and cell not in ("",)


def _html_cell(c: str, numeric: bool) -> str:
    first, *rest = c.split("\n")
    body = html.escape(first) + "".join(f'<br><span class="sub">{html.escape(r)}</span>' for r in rest)
    return f'<td class="num">{body}</td>' if numeric else f"<td>{body}</td>"


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    out = ['<div class="wide"><table>', "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(_html_cell(c, i > 1 and _is_num(c)) for i, c in enumerate(r)) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|").replace("\n", " — ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _samples_rows(post: Posterior, k: int) -> tuple[list[str], list[dict]]:
    top = D.top_samples(post, k)
    cols = [c for c in D.stat_names(post) if c.startswith("reward:")]
    # A constraint column only where it varies among the samples shown (usually it is all 1).
    cols += [c for c in D.stat_names(post) if c.startswith("ok:")
             and len({t["stats"].get(c) for t in top}) > 1]
    return cols[:4], top


def _html_samples(post: Posterior, k: int, limit: int) -> str:
    cols, top = _samples_rows(post, k)
    head = "<tr><th>#</th><th>weight</th><th>count</th>" + "".join(
        f"<th>{html.escape(c)}</th>" for c in cols) + "<th>text</th></tr>"
    body = []
    for i, s in enumerate(top, 1):
        body.append(
            f'<tr><td class="num">{i}</td><td class="num">{html.escape(_fmt(s["weight"], 4))}</td>'
            f'<td class="num">{s["count"]}</td>'
            + "".join(f'<td class="num">{html.escape(_fmt(s["stats"].get(c)))}</td>' for c in cols)
            + f'<td class="text">{_html_text(s["text"], limit)}</td></tr>')
    return "<table>" + head + "".join(body) + "</table>"


def _md_samples(post: Posterior, k: int, limit: int) -> str:
    cols, top = _samples_rows(post, k)
    head = ["#", "weight", "count"] + cols + ["text"]
    rows = [[str(i), _fmt(s["weight"], 4), str(s["count"])] + [_fmt(s["stats"].get(c)) for c in cols]
            + [_md_text(s["text"], limit)] for i, s in enumerate(top, 1)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


_NOT_SETTINGS = {"trace", "wall_time", "acceptance", "acceptance_overall", "rhat", "khat", "ess", "ess_by_stat",
                 "log_evidence_se", "sample_stats", "move_names", "elbo", "num_nonzero"}


def _settings(post: Posterior) -> str:
    """The run's settings and facts from ``info`` (scalars, and dicts of scalars), as ``k=v`` text."""
    out = []
    for k, v in post.info.items():
        if k in _NOT_SETTINGS:
            continue
        if isinstance(v, dict) and v and all(isinstance(x, (int, float, str)) for x in v.values()):
            v = "{" + ", ".join(f"{a}: {_fmt(b, 2) if isinstance(b, float) else b}" for a, b in v.items()) + "}"
        elif isinstance(v, float):
            v = _fmt(v)
        elif not isinstance(v, (int, str, bool)):
            continue
        out.append(f"{k}={v}")
    return ", ".join(out)


# -- the report ---------------------------------------------------------------------------------

def _check_inputs(posteriors, out_dir, exact) -> dict[str, Posterior]:
    if isinstance(posteriors, Posterior):
        posteriors = {posteriors.method: posteriors}
    if not isinstance(posteriors, Mapping) or not posteriors:
        raise TypeError("report() takes a non-empty dict name -> Posterior, e.g. {'IS': post_is}")
    for n, p in posteriors.items():
        if not isinstance(p, Posterior):
            raise TypeError(f"report(): posteriors[{n!r}] is a {type(p).__name__}, not a ppl_lm.Posterior")
        if len(p) == 0:
            raise ValueError(f"report(): posteriors[{n!r}] has no samples")
    if exact is not None and not isinstance(exact, Posterior):
        raise TypeError(f"report(): exact must be a Posterior (method='exact'), got {type(exact).__name__}")
    if exact is not None and exact.log_evidence is None:
        raise ValueError("report(): the exact posterior has no log_evidence")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"report(): {out} exists and is not a folder")
    return {str(n): p for n, p in posteriors.items()}


def report(posteriors: Mapping[str, Posterior] | Posterior, out_dir: str | os.PathLike, *,
           title: str | None = None, exact: Posterior | None = None, top_k: int = 10,
           max_text_chars: int = 400, description: str | None = None) -> Path:
    """Write an HTML report comparing posteriors; returns the path of ``report.html``.

    Args:
        posteriors: name -> Posterior (a single Posterior is named by its method).
        out_dir: the report folder (created; files of an earlier report are replaced).
        title: the report's heading.
        exact: the exact posterior (toy models), drawn as the reference and used for a
            TV-distance and log Z error column.
        top_k: how many distinct top-weighted samples to list per posterior.
        max_text_chars: longer sample texts are cut.
        description: a paragraph under the title (the model, its condition, the context).

    The table's numbers come from :func:`ppl_lm.diagnostics.summary`; ``summary.json`` holds
    them unformatted.
    """
    posteriors = _check_inputs(posteriors, out_dir, exact)
    out = Path(out_dir).absolute()
    title = title or "ppl-lm report: " + ", ".join(posteriors)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        files = _build(posteriors, exact, tmp, title, top_k, max_text_chars, description)
        _publish(tmp, out, files)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("report written to %s", out / "report.html")
    return out / "report.html"


def _build(posteriors, exact, tmp: Path, title: str, top_k: int, limit: int,
           description: str | None = None) -> list[str]:
    """Write every file of the report into ``tmp``; returns their names, ``report.html`` last."""
    from . import __version__

    rows = summary_rows(posteriors, exact)
    head, cells = _table(rows, exact is not None)
    settings = [[n, p.method, _settings(p)] for n, p in posteriors.items()]

    figures = []  # (file, section, caption, base64)
    for fname, section, caption, draw in _figure_specs(posteriors, exact):
        fig = draw()
        if fig is None:
            continue
        data = _png(fig)
        (tmp / fname).write_bytes(data)
        figures.append((fname, section, caption, base64.b64encode(data).decode("ascii")))

    def fig_html(f):
        fname, _, caption, b64 = f
        return (f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(fname)}">'
                f'<figcaption>{html.escape(caption)} <a href="{html.escape(fname)}">{html.escape(fname)}</a>'
                "</figcaption></figure>")

    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">ppl-lm {html.escape(__version__)} · {now}</p>',
        f'<p class="desc">{html.escape(description)}</p>' if description else "",
        "<h2>Summary</h2>", _html_table(head, cells),
        '<p class="note">ESS in brackets: ESS / N. Means E[·] are posterior (weighted) means. k-hat: Pareto '
        "shape of the importance weights (&lt; 0.5 good, &gt; 0.7 unreliable). R-hat: largest split R-hat "
        "over the chains' summaries (&lt; 1.01 good).</p>",
        "<h3>Run settings</h3>", _html_table(["backend", "method", "settings"], settings),
    ]
    for sec, heading in (("distributions", "Reward distributions"), ("weights", "Weight diagnostics")):
        figs = [f for f in figures if f[1] == sec]
        if figs:
            parts.append(f"<h2>{heading}</h2>")
            parts += [fig_html(f) for f in figs]
    for n in posteriors:
        figs = [f for f in figures if f[1] == n]
        if figs:
            parts.append(f"<h2>{html.escape(n)}: diagnostics</h2>")
            parts += [fig_html(f) for f in figs]
    parts.append("<h2>Samples</h2>")
    parts.append(f'<p class="note">The {top_k} distinct samples with the largest total posterior weight '
                 "(count: how many times each occurs).</p>")
    for n, p in posteriors.items():
        parts.append(f"<h3>{html.escape(n)}</h3>")
        parts.append(_html_samples(p, top_k, limit))
    parts.append("</body></html>")
    (tmp / "report.html").write_text("\n".join(parts), encoding="utf-8")

    md = [f"# {title}", ""] + ([description, ""] if description else []) + [_md_table(head, cells), "", "## Run settings", "",
          _md_table(["backend", "method", "settings"], settings), ""]
    for fname, _, caption, _ in figures:
        md += [f"![{caption}]({fname})", ""]
    md.append("## Samples")
    for n, p in posteriors.items():
        md += ["", f"### {n}", "", _md_samples(p, top_k, limit)]
    (tmp / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    names = [f[0] for f in figures] + ["summary.md", "summary.json", "report.html"]
    (tmp / "summary.json").write_text(json.dumps(
        _json_safe({"title": title, "rows": rows, "files": names}), indent=2, default=_json_default,
        allow_nan=False), encoding="utf-8")
    return names


def _json_safe(v):
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        return str(float(v))
    return v


def _json_default(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _publish(tmp: Path, out: Path, files: list[str]) -> None:
    """Move the finished report into place: one rename if ``out`` is new, else file by file."""
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not out.is_dir():
            raise
    old = out / "summary.json"
    stale: list[str] = []
    if old.is_file():
        try:
            stale = [f for f in json.loads(old.read_text()).get("files", []) if f not in files]
        except (ValueError, OSError):
            stale = []
    for f in files:  # report.html comes last: once it is there, everything it shows is there
        os.replace(tmp / f, out / f)
    for f in stale:  # figures of an earlier report that this one does not have
        p = out / f
        if p.suffix == ".png" and p.parent == out and p.is_file():
            p.unlink()


FIGURES = ("fig_rewards", "fig_weights", "fig_mh_trace", "fig_mh_rank", "fig_svi", "fig_smc")


class _CallableModule(types.ModuleType):
    """``ppl_lm.report`` is both this module and the function ``report``.

    Importing the submodule ``ppl_lm.report`` makes Python bind it as the attribute
    ``ppl_lm.report``, shadowing the package's ``report()`` function; a callable module keeps
    ``ppl_lm.report({...}, "out")`` working however the two were imported.
    """

    def __call__(self, *args, **kwargs):
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
