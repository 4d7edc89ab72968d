"""The report's figures, each a function of posteriors returning a matplotlib Figure (Agg, no pyplot)."""

from __future__ import annotations

import io
import logging
import math
import sys
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from ..backends import Kind
from .. import diagnostics as D
from ..diagnostics.inference_data import import_arviz
from .render import fmt
from ..posterior import Posterior


log = logging.getLogger(__name__)

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
EXACT_COLOR = "#222222"
MAX_TRACE_VARS = 4


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


def _series(posteriors: Mapping[str, Posterior], exact: Posterior | None) -> dict[str, Posterior]:
    return {"exact": exact, **posteriors} if exact is not None else dict(posteriors)


def constant_quantities(posteriors: Mapping[str, Posterior], exact: Posterior | None = None) -> dict[str, float]:
    """Quantities with one value in every sample of every posterior (no panel: the caption says it)."""
    out = {}
    for q in _quantities(posteriors):
        vals = [_finite_weighted(p, q)[0] for p in _series(posteriors, exact).values() if q in p.stats]
        uniq = np.unique(np.concatenate(vals)) if vals else np.array([])
        if len(uniq) == 1:
            out[q] = float(uniq[0])
    return out


def fig_rewards(posteriors: Mapping[str, Posterior], exact: Posterior | None = None):
    """Weighted distributions of each reward, the length and the log prior, backends side by side.

    A quantity with one value everywhere gets no panel (:func:`constant_quantities`); integer
    quantities (counts, lengths) are bars, real-valued ones (log prior, soft rewards) histograms.
    """
    constant = constant_quantities(posteriors, exact)
    qs = [q for q in _quantities(posteriors) if q not in constant]
    if not qs:
        return None
    series = _series(posteriors, exact)
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
        # Bars only for integer values: a real-valued quantity with few distinct values (few
        # samples) is still continuous, and as categories its labels overlap and mislead.
        integer = bool(np.all(uniq == np.round(uniq)))
        if integer and len(uniq) <= 10:
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
        elif integer and len(uniq) <= 60:
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


def _khat_text(k: float) -> str:
    """k-hat as shown: "—: tied" where the largest weights are tied (no tail), else the number."""
    return "— (tied weights)" if k == -math.inf else fmt(k, 2)


def fig_weights(posteriors: Mapping[str, Posterior], exact: Posterior | None = None):
    """Sorted normalised importance weights (N·w against rank / N) and k-hat per weighted backend."""
    weighted = {n: p for n, p in posteriors.items() if not D.is_mcmc(p) and p.kind is not Kind.EXACT}
    if not weighted:
        return None
    colors = _colors(posteriors)
    fig = _figure(11, 3.6)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2, 1])
    ax1.axhline(1.0, color="grey", ls=":", lw=1, zorder=1, label="uniform weights")
    lo = hi = 1.0
    for n, p in weighted.items():
        w = np.sort(p.weights.detach().cpu().numpy())[::-1] * len(p)
        x = (np.arange(len(w)) + 1) / len(w)
        pos = w > 0
        k = D.psis_khat(p)
        label = f"{n}: ESS/N {p.ess / len(p):.2f}" + ("" if k is None else f", k-hat {_khat_text(k)}")
        if np.ptp(w[pos]) <= 1e-6 * w[pos].max():
            label += " (equal weights)"  # e.g. SMC after its final resampling: on the uniform line
        if (~pos).any():
            label += f"; {int((~pos).sum())} at weight 0"
        # Markers where there are few samples, so a line lying on the uniform one stays visible.
        ax1.step(x[pos], w[pos], where="post", color=colors[n], lw=1.8, zorder=3, label=label,
                 marker="o" if pos.sum() <= 40 else None, ms=3)
        lo, hi = min(lo, float(w[pos].min())), max(hi, float(w[pos].max()))
    ax1.set_yscale("log")
    # At least a decade on each side of 1: with equal weights the axis would otherwise span one
    # value, and matplotlib labels every tick of it "10 × 10⁻¹".
    ax1.set_ylim(min(lo / 2, 0.1), max(hi * 2, 10))
    ax1.set_xlim(0, 1.02)
    ax1.set_xlabel("rank / N (largest weight first)")
    ax1.set_ylabel("N · normalised weight")
    ax1.set_title("sorted importance weights")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)

    names = list(weighted)
    ks = [D.psis_khat(weighted[n]) for n in names]
    ess = [weighted[n].ess / len(weighted[n]) for n in names]
    pos = np.arange(len(names))
    finite = [k is not None and math.isfinite(k) for k in ks]
    # Only a finite k-hat is a bar; an infinite one (too few distinct weights to fit a tail) or
    # a missing one (SMC's resampled particles have no importance weights to fit) is named
    # under its backend instead of drawn as a bar to the edge of the axis.
    ax2.bar(pos[finite] - 0.2, [k for k, f in zip(ks, finite) if f], 0.4,
            color=[colors[n] for n, f in zip(names, finite) if f])
    ax2.bar(pos + 0.2, ess, 0.4, color=[colors[n] for n in names], alpha=0.4, hatch="..")
    ax2.axhline(0.5, color="#b22222", ls=":", lw=1, label="k-hat 0.5 (good below)")
    ax2.axhline(0.7, color="#b22222", ls="--", lw=1, label="k-hat 0.7 (unreliable above)")
    ax2.legend(fontsize=7)
    for i, (k, f) in enumerate(zip(ks, finite)):
        if f:
            ax2.text(i - 0.2, max(k, 0) + 0.02, fmt(k, 2), ha="center", fontsize=7)
    ticks = [n if f else f"{n}\n(k-hat {'—' if k is None else _khat_text(k)})"
             for n, k, f in zip(names, ks, finite)]
    ax2.set_xticks(pos, ticks)
    low = min([0.0] + [k for k, f in zip(ks, finite) if f])
    ax2.set_ylim(low - 0.05 if low < 0 else 0, max([1.05] + [k + 0.1 for k, f in zip(ks, finite) if f]))
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
    az = import_arviz()
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
    trace = getattr(post.info, "trace", None)
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
    hist = getattr(post.info, "ess_history", None)
    if hist is None or len(hist) == 0:
        return None
    y = np.asarray(hist, dtype=float).reshape(len(hist), -1).mean(-1)
    n = float(getattr(post.info, "num_particles", None) or len(post))
    fig = _figure(7, 3)
    ax = fig.subplots()
    ax.plot(np.arange(1, len(y) + 1), y / n, "o-", ms=3, color=PALETTE[0], label="ESS / N")
    thr = getattr(post.info, "ess_threshold", None)
    if isinstance(thr, (int, float)):
        ax.axhline(thr, color="#b22222", ls="--", lw=1, label=f"resampling threshold {thr:g}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("token step")
    ax.set_ylabel("ESS / N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: particle ESS per step")
    return fig


def _constants_caption(posteriors, exact) -> str:
    const = constant_quantities(posteriors, exact)
    return (" The same in every sample, so not drawn: " + ", ".join(f"{q} = {v:.4g}" for q, v in const.items())
            + ".") if const else ""


def figure_specs(posteriors, exact) -> list[tuple[str, str, str, Callable[[], Any]]]:
    """(file name, section, caption, draw) for every figure of the report, in order."""
    mod = sys.modules[__name__]  # look functions up at call time (tests replace them)
    specs = [
        ("rewards.png", "distributions", "Weighted posterior distributions of each reward, the length "
         "and the log prior (bars: integer values; lines: histograms)." + _constants_caption(posteriors, exact),
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
        if getattr(p.info, "ess_history", None) is not None:
            specs.append((f"smc_{slug}.png", n, f"{n}: ESS / N per token step; below the threshold the "
                          "particles are resampled.", lambda n=n, p=p: mod.fig_smc(n, p)))
        if isinstance(getattr(p.info, "trace", None), dict):
            specs.append((f"svi_{slug}.png", n, f"{n}: SVI objective and its terms per step.",
                          lambda n=n, p=p: mod.fig_svi(n, p, exact)))
    return specs


def _slug(name: str, i: int) -> str:
    s = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")
    return s or f"posterior{i}"


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# -- documents ----------------------------------------------------------------------------------


FIGURES = ("fig_rewards", "fig_weights", "fig_mh_trace", "fig_mh_rank", "fig_svi", "fig_smc")
