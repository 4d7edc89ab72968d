"""Formatting and rendering: numbers, tables, HTML and Markdown text."""

from __future__ import annotations

import html
import logging
import math
from typing import Any, Mapping

import numpy as np

from .. import diagnostics as D
from ..posterior import Posterior


log = logging.getLogger(__name__)


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
