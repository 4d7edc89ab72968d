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
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..posterior import Posterior
from .figures import FIGURES, figure_specs, png
from .render import (
    CSS, html_samples, html_table, marginal_rows, html_warnings, md_samples, md_table, md_warnings, settings_rows, table_rows,
    report_warnings, summary_rows, verdict_html, verdict_md,
)


__all__ = ["report", "summary_rows", "check_out_dir", "FIGURES"]

log = logging.getLogger(__name__)


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
    try:
        check_out_dir(out_dir)
    except ValueError as err:
        raise ValueError(f"report(): {err}") from None
    return {str(n): p for n, p in posteriors.items()}


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path if a report can be written there, else a ValueError saying why.

    Cheap, so the CLI calls it before a run: a bad ``--report`` path costs nothing.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; give a new or existing folder for the report")
    probe = out
    while not probe.exists():  # the nearest folder that exists is where the report's folders get made
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{probe} is not a folder, so {out} cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"no permission to write in {probe}; give a folder you can write to")
    return out


def report(posteriors: Mapping[str, Posterior] | Posterior, out_dir: str | os.PathLike, *,
           title: str | None = None, exact: Posterior | None = None, top_k: int = 10,
           max_text_chars: int = 400, description: str | None = None,
           failed: Mapping[str, str] | None = None) -> Path:
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
        failed: backends that were asked for but failed, name -> error text: listed first,
            among the warnings, so a failed run never just disappears.

    The table's numbers come from :func:`ppl_lm.diagnostics.summary`; ``summary.json`` holds
    them unformatted.
    """
    posteriors = _check_inputs(posteriors, out_dir, exact)
    out = Path(out_dir).absolute()
    title = title or "ppl-lm report: " + ", ".join(posteriors)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        files = _build(posteriors, exact, tmp, title, top_k, max_text_chars, description, failed or {})
        _publish(tmp, out, files)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("report written to %s", out / "report.html")
    return out / "report.html"


def _build(posteriors, exact, tmp: Path, title: str, top_k: int, limit: int,
           description: str | None = None, failed: Mapping[str, str] | None = None) -> list[str]:
    """Write every file of the report into ``tmp``; returns their names, ``report.html`` last."""
    from .. import __version__

    rows = summary_rows(posteriors, exact)
    head, cells = table_rows(rows, exact is not None)
    settings = [[n, p.method, settings_rows(p)] for n, p in posteriors.items()]
    warned = report_warnings(posteriors, exact, failed)

    figures = []  # (file, section, caption, base64)
    for fname, section, caption, draw in figure_specs(posteriors, exact):
        fig = draw()
        if fig is None:
            continue
        data = png(fig)
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
        f"<h2>Warnings ({len(warned)})</h2>" if warned else "<h2>Warnings</h2>", html_warnings(warned),
        "<h2>Verdict</h2>", verdict_html(rows),
        "<h2>Summary</h2>", html_table(head, cells),
        '<p class="note">ESS: Kish\'s effective sample size of the weights (weighted samples) or ArviZ\'s bulk '
        "ESS (MCMC); in brackets ESS / N. SMC genealogy n_eff: how many independent draws SMC's particles are "
        "worth given their shared ancestors. Means E[·] are posterior (weighted) means. k-hat: Pareto shape of "
        "the importance weights (&lt; 0.5 good, &gt; 0.7 unreliable). R-hat: largest split R-hat over the "
        "chains' summaries (&lt; 1.01 good). ⚠ marks a value past its threshold. — with a reason: the number is "
        "undefined or would be no error bar (one ancestor, a handful of effective draws, tied weights). Error vs exact: "
        "each mean minus the exact one, worst first, in Monte Carlo sd (exact sd / √effective draws; ⚠ past 4).</p>",
        "<h3>Run settings</h3>", html_table(["backend", "method", "settings"], settings, numbers=False),
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
    shown = ({"exact": exact} if exact is not None else {}) | dict(posteriors)
    marginals = {n: marginal_rows(p) for n, p in shown.items()}
    if any(marginals.values()):
        parts.append("<h2>Discrete latents</h2>")
        parts.append('<p class="note">The posterior probability of each value of every discrete latent site, '
                     "with its standard error (0 for exact enumeration).</p>")
        parts.append(html_table(["backend", "site", "value", "probability", "se"],
                                 [[n, *r] for n, rows_ in marginals.items() for r in rows_]))
    parts.append("<h2>Samples</h2>")
    parts.append(f'<p class="note">The {top_k} distinct samples with the largest total posterior weight '
                 "(count: how many times each occurs).</p>")
    for n, p in posteriors.items():
        parts.append(f"<h3>{html.escape(n)}</h3>")
        parts.append(html_samples(p, top_k, limit))
    parts.append("</body></html>")
    (tmp / "report.html").write_text("\n".join(parts), encoding="utf-8")

    md = [f"# {title}", ""] + ([description, ""] if description else []) + [
          "## Warnings", "", md_warnings(warned), "", "## Verdict", "", verdict_md(rows), "",
          "## Summary", "", md_table(head, cells), "", "## Run settings", "",
          md_table(["backend", "method", "settings"], settings), ""]
    for fname, _, caption, _ in figures:
        md += [f"![{caption}]({fname})", ""]
    if any(marginals.values()):
        md += ["## Discrete latents", "", md_table(["backend", "site", "value", "probability", "se"],
                                                    [[n, *r] for n, rows_ in marginals.items() for r in rows_]), ""]
    md.append("## Samples")
    for n, p in posteriors.items():
        md += ["", f"### {n}", "", md_samples(p, top_k, limit)]
    (tmp / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    names = [f[0] for f in figures] + ["summary.md", "summary.json", "report.html"]
    (tmp / "summary.json").write_text(json.dumps(
        _json_safe({"title": title, "rows": rows, "files": names,
                    "warnings": [{"backend": n, "code": w.code, "message": w.message, "fix": w.fix}
                                 for n, w in warned]}), indent=2, default=_json_default,
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
