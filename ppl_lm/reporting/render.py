"""Formatting and rendering: numbers, tables, HTML and Markdown text."""

from __future__ import annotations

import html
import logging
import math
from typing import Any, Callable, Mapping

import numpy as np

from .. import diagnostics as D
from ..diagnostics.compare import disagreeing_backends
from ..diagnostics.estimators import KHAT_THRESHOLD, RHAT_THRESHOLD
from ..diagnostics.warnings import InferenceWarning
from ..posterior import Posterior


log = logging.getLogger(__name__)


# -- numbers ------------------------------------------------------------------------------------

def fmt(v: Any, digits: int = 3) -> str:
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
        row.pop("warnings", None)  # shown in their own section (report_warnings)
        if exact is not None:
            # the law of the sequences, or of the other latents when every text is observed
            row["tv_to_exact"] = _tv(post, exact) if (post.samples is None) == (exact.samples is None) else None
            row["log_evidence_error"] = (None if post.log_evidence is None
                                         else post.log_evidence - exact.log_evidence)
            row["error_vs_exact"] = None if post is exact else mean_errors(post, exact)
        rows.append(row)
    return rows


def mean_errors(post: Posterior, exact: Posterior) -> dict[str, dict[str, float]]:
    """Each posterior mean's error against the exact one: ``{name: {"error", "sd"}}``, ``sd`` being
    the error in Monte Carlo standard deviations, sd_exact / sqrt(effective draws) (0 for exact)."""
    out = {}
    n_eff = D.effective_draws(post)
    for name, mean in D.summary(post)["means"].items():
        if name not in exact.stats or not math.isfinite(mean):
            continue
        ref = D.weighted_stats(exact, exact.stats[name])
        err = mean - ref["mean"]
        scale = ref["sd"] / math.sqrt(n_eff) if n_eff > 0 else math.inf
        z = 0.0 if err == 0 or math.isinf(n_eff) else (err / scale if scale > 0 else math.inf)
        out[name] = {"error": err, "sd": z}
    return out


def _info(post: Posterior, key: str):
    """A run-level fact of ``post`` by name (a field of its typed Info record; ``None`` if it has none)."""
    return getattr(post.info, key, None)


def _genealogy(row: dict) -> float | None:
    v = row.get("n_eff_genealogy")
    return None if v is None or math.isnan(float(v)) else float(v)


#: Above these a diagnostic is marked in the table (the thresholds of the warnings' detectors).
RHAT_MAX = RHAT_THRESHOLD
KHAT_MAX = KHAT_THRESHOLD
FLAG = " ⚠"


def _flagged(text: str, bad: bool) -> str:
    return text + FLAG if bad else text


def _mean_columns(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r["means"]:
            if k not in names:
                names.append(k)
    order = lambda k: (0 if k.startswith("reward:") else 1 if k.startswith("ok:") else 2, names.index(k))  # noqa: E731
    return sorted(names, key=order)


def table_rows(rows: list[dict], exact: bool) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the summary table (shared by HTML and Markdown)."""
    means = _mean_columns(rows)
    # One ESS on the page (Posterior.ess); SMC's genealogy-based count is another quantity, in its
    # own column, named.
    lineages = any(_genealogy(r) is not None for r in rows)
    head = ["backend", "method", "samples", "log Z ± se", "ESS (ESS / N)"]
    head += ["SMC genealogy n_eff"] if lineages else []
    head += ["k-hat", "R-hat", "acceptance"]
    head += [f"E[{m}]" for m in means]
    if exact:
        head += ["error vs exact", "TV to exact", "log Z error"]
    head += ["wall time"]
    cells = []
    for r in rows:
        lz = fmt(r["log_evidence"], 4)
        if r["log_evidence"] is not None and r["log_evidence_se"] is not None:
            lz += f" ± {fmt(r['log_evidence_se'], 4)}"
        elif r["log_evidence"] is not None and r.get("log_evidence_se_reason"):
            lz += f" ± —\n({r['log_evidence_se_reason']})"  # no fake error bar
        if r.get("log_evidence_bounds") is not None:  # from exact draws (ppl_lm.log_evidence_bounds)
            lz += "\nbounds [{}, {}]".format(*(fmt(v, 4) for v in r["log_evidence_bounds"]))
        samples = fmt(r["num_samples"])
        if r["num_chains"] > 1:
            samples += f" ({r['num_chains']} chains)"
        acc = fmt(r["acceptance"])
        if r["acceptance_moves"]:
            acc += "\n" + ", ".join(f"{k} {fmt(v, 2)}" for k, v in r["acceptance_moves"].items())
        khat, rhat = r["khat"], r["rhat"]
        ess = f"{fmt(r['ess'], 1)} ({fmt(r['ess'] / r['num_samples'], 2)})"
        if r.get("ess_note"):
            ess += f"\n{r['ess_note']}"
        row = [r["name"], r["method"], samples, lz, ess]
        if lineages:
            row += [fmt(_genealogy(r), 1)]
        k_cell = _flagged(fmt(khat, 2), khat is not None and khat > KHAT_MAX)
        if khat is None and r.get("khat_reason"):
            k_cell += f"\n({r['khat_reason']})"
        row += [k_cell,
                _flagged(fmt(rhat), rhat is not None and not rhat <= RHAT_MAX), acc]
        row += [fmt(r["means"].get(m)) for m in means]
        if exact:
            errors = r.get("error_vs_exact")
            row += ["reference" if errors is None else _error_cell(errors), fmt(r["tv_to_exact"]),
                    fmt(r["log_evidence_error"], 4)]
        row += [_fmt_time(r["wall_time"])]
        cells.append(row)
    return head, cells


#: A mean further from the exact one than this many Monte Carlo sd is marked (4: 6e-5 by chance).
ERROR_SD_MAX = 4.0


def _error_cell(errors: dict[str, dict[str, float]]) -> str:
    """Each mean's error vs exact, worst first, in Monte Carlo sd: ``length +0.120 (1.3 sd)``."""
    if not errors:
        return "—"
    items = sorted(errors.items(), key=lambda kv: -abs(kv[1]["sd"]))
    lines = [f"{n} {v['error']:+.3f}" + (f" ({abs(v['sd']):.1f} sd)" if v["sd"] else "") for n, v in items]
    lines[0] = _flagged(lines[0], abs(items[0][1]["sd"]) > ERROR_SD_MAX)
    return "\n".join(lines)


def verdict_html(rows: list[dict]) -> str:
    """One line per backend: can its estimates be trusted (``summary``'s ``verdict``)."""
    items = "".join(
        f'<li class="{"ok" if r["verdict"].startswith("yes") else "no"}"><b>{html.escape(r["name"])}</b>: '
        f"can be trusted: {html.escape(r['verdict'])}</li>" for r in rows)
    return f'<ul class="verdict">{items}</ul>'


def verdict_md(rows: list[dict]) -> str:
    return "\n".join(f"- **{r['name']}**: can be trusted: {r['verdict']}" for r in rows)


# -- figures ------------------------------------------------------------------------------------


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
td.bad,tr:nth-child(even) td.bad{background:#fde8e8;color:#8b0000;font-weight:600}
.warnings table{border-left:4px solid #c0392b}.warnings td{background:#fff8f6}
.ok{color:#1e7b34}
.verdict{list-style:none;padding-left:0}.verdict li{margin:.2em 0}.verdict li.no{color:#8b0000}
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
    cls = " ".join(k for k, on in (("num", numeric), ("bad", first.endswith(FLAG))) if on)
    return f'<td class="{cls}">{body}</td>' if cls else f"<td>{body}</td>"


def html_table(head: list[str], rows: list[list[str]], numbers: bool = True) -> str:
    """An HTML table; with ``numbers``, cells after the first two that read as numbers are right-aligned."""
    out = ['<div class="wide"><table>', "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(_html_cell(c, numbers and i > 1 and _is_num(c)) for i, c in enumerate(r))
                   + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|").replace("\n", " — ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def admissible_top(post: Posterior, k: int) -> tuple[list[dict], int]:
    """The ``k`` distinct samples of largest total weight among those of positive weight, and
    how many samples (with repeats) have weight 0 (a hard condition fails): those are not shown."""
    rejected = int((post.weights <= 0).sum())
    top = D.top_samples(post, len(post)) if rejected else D.top_samples(post, k)
    return [t for t in top if t["weight"] > 0][: max(k, 0)], rejected


def rejected_note(rejected: int, n: int) -> str:
    return (f"{rejected:,} of {n:,} samples have weight 0 (a hard condition fails) and are not listed."
            if rejected else "")


def _samples_rows(post: Posterior, k: int) -> tuple[list[str], list[dict]]:
    top, _ = admissible_top(post, k)
    cols = [c for c in D.stat_names(post) if c.startswith("reward:")]
    # A constraint column only where it varies among the samples shown (usually it is all 1).
    cols += [c for c in D.stat_names(post) if c.startswith("ok:")
             and len({t["stats"].get(c) for t in top}) > 1]
    return cols[:4], top


def html_samples(post: Posterior, k: int, limit: int) -> str:
    if post.samples is None:
        return f'<p class="note">{html.escape(NO_TEXT_NOTE)}</p>'
    cols, top = _samples_rows(post, k)
    head = "<tr><th>#</th><th>weight</th><th>count</th>" + "".join(
        f"<th>{html.escape(c)}</th>" for c in cols) + "<th>text</th></tr>"
    body = []
    for i, s in enumerate(top, 1):
        body.append(
            f'<tr><td class="num">{i}</td><td class="num">{html.escape(fmt(s["weight"], 4))}</td>'
            f'<td class="num">{s["count"]}</td>'
            + "".join(f'<td class="num">{html.escape(fmt(s["stats"].get(c)))}</td>' for c in cols)
            + f'<td class="text">{_html_text(s["text"], limit)}</td></tr>')
    note = rejected_note(int((post.weights <= 0).sum()), len(post))
    return "<table>" + head + "".join(body) + "</table>" + (f'<p class="note">{html.escape(note)}</p>' if note else "")


NO_TEXT_NOTE = "Every lm.sequence(...) site of this model is observed: there is no sampled text to list."


def marginal_rows(post: Posterior) -> list[list[str]]:
    """``[site, value, probability, standard error]`` of every discrete scalar latent."""
    return [[name, str(value), fmt(p, 4), fmt(se, 4)]
            for name, m in D.discrete_marginals(post).items() for value, (p, se) in m.items()]


def md_samples(post: Posterior, k: int, limit: int) -> str:
    if post.samples is None:
        return NO_TEXT_NOTE
    cols, top = _samples_rows(post, k)
    head = ["#", "weight", "count"] + cols + ["text"]
    rows = [[str(i), fmt(s["weight"], 4), str(s["count"])] + [fmt(s["stats"].get(c)) for c in cols]
            + [_md_text(s["text"], limit)] for i, s in enumerate(top, 1)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = rejected_note(int((post.weights <= 0).sum()), len(post))
    return "\n".join(lines + (["", note] if note else []))


def _n(v) -> str:
    return fmt(int(v)) if isinstance(v, (int, np.integer)) or float(v).is_integer() else fmt(v)


def _moves(v) -> str:
    return "moves " + ", ".join(f"{m.replace('_', ' ')} {float(p):.0%}" for m, p in v.items())


#: The run settings a report shows, in words, in this order (key -> phrase; anything else a
#: backend records is a diagnostic or an internal detail and stays out of this line).
SETTING_WORDS: dict[str, Callable[[Any], str]] = {
    "num_particles": lambda v: f"{_n(v)} particles",
    "num_replicates": lambda v: f"{_n(v)} independent replicate" + ("s" if v != 1 else ""),
    "num_chains": lambda v: f"{_n(v)} chains",
    "num_samples": lambda v: f"{_n(v)} samples",
    "warmup_steps": lambda v: f"{_n(v)} warm-up steps per chain",
    "thin": lambda v: "every draw kept" if v == 1 else f"every {_n(v)}th draw kept",
    "moves": _moves,
    "num_steps": lambda v: f"{_n(v)} optimisation steps",  # SVI only (SMC's is its token count)
    "guide": lambda v: f"{v} guide",
    "objective": lambda v: f"{v} objective",
    "lr": lambda v: f"learning rate {fmt(v)}",
    "proposal": lambda v: f"proposal: {v}",
    "resampling": lambda v: f"{v} resampling",
    "ess_threshold": lambda v: f"resampling when ESS / N < {fmt(v, 2)}",
    "chunk_size": lambda v: f"{_n(v)} particles in memory at once",
}


def _svi_draws(v) -> str:
    return f"{_n(v)} guide draws per step"


def settings_rows(post: Posterior) -> str:
    """The run's settings in words, e.g. ``64 particles, multinomial resampling when ESS / N < 0.50, seed 0``."""
    out = []
    trained = post.guide is not None  # num_steps and num_particles are then the guide's training's
    size = _info(post, "num_particles") if post.ancestor is not None else _info(post, "num_samples")
    for key, words in SETTING_WORDS.items():
        if key == "num_steps" and not trained:
            continue
        v = _info(post, key)
        if key == "chunk_size" and isinstance(size, int) and isinstance(v, int) and v >= size:
            continue  # every particle fits at once: nothing to say
        if key == "num_particles" and trained:
            words = _svi_draws
        if v is None or isinstance(v, float) and not math.isfinite(v):
            continue
        try:
            out.append(words(v))
        except (TypeError, ValueError, AttributeError):  # a value of another shape than expected
            log.debug("setting %s=%r left out of the report", key, v)
    if post.seed is not None:
        out.append(f"seed {post.seed}")
    return ", ".join(out)


# -- warnings -----------------------------------------------------------------------------------

def report_warnings(posteriors: Mapping[str, Posterior], exact: Posterior | None = None,
                    failed: Mapping[str, str] | None = None) -> list[tuple[str, InferenceWarning]]:
    """``(backend, warning)`` pairs a report shows first: the backends' disagreement, the runs
    that failed, then each posterior's own warnings."""
    both = {**({"exact": exact} if exact is not None else {}), **posteriors}
    out = [("all", w) for w in disagreeing_backends(both)]
    out += [(n, InferenceWarning("failed", f"The run failed: {err}",
                                 "this backend has no result below; the error says what to change."))
            for n, err in (failed or {}).items()]
    for n, p in both.items():
        out += [(n, w) for w in p.warnings]
    return out


def html_warnings(items: list[tuple[str, InferenceWarning]]) -> str:
    if not items:
        return '<p class="ok">No warnings: no check on these runs found a problem.</p>'
    rows = "".join(
        f'<tr><td>{html.escape(n)}</td><td><code>{html.escape(w.code)}</code></td>'
        f"<td>{html.escape(w.message)}</td><td>{html.escape(w.fix)}</td></tr>" for n, w in items)
    return ('<div class="warnings"><table><tr><th>backend</th><th>warning</th><th>what it means</th>'
            f"<th>what to do</th></tr>{rows}</table></div>")


def md_warnings(items: list[tuple[str, InferenceWarning]]) -> str:
    if not items:
        return "No warnings: no check on these runs found a problem."
    return md_table(["backend", "warning", "what it means", "what to do"],
                     [[n, w.code, w.message, w.fix] for n, w in items])


# -- the report ---------------------------------------------------------------------------------
