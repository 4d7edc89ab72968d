"""ppl_lm.reporting: the files, their content against the Posteriors, escaping, atomic writing."""

from __future__ import annotations

import base64
import importlib
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import ppl_lm
from ppl_lm import diagnostics as D
from ppl_lm.backends import Kind
from ppl_lm.posterior import Info, Posterior, normalise
from toys import PROBLEMS, markov_lm

R = importlib.import_module("ppl_lm.reporting.figures")  # the figure functions


@pytest.fixture(scope="module")
def toy():
    lm = markov_lm()
    model, args = PROBLEMS["soft_reward"](lm)
    exact = ppl_lm.infer(model, *args, method="exact")
    return lm, model, args, exact


def kish(post) -> float:
    w = post.weights.double()
    return float(w.sum() ** 2 / (w ** 2).sum())


def bulk_ess(post) -> float:
    import arviz as az

    ds = az.ess(post.to_inference_data(), method="bulk")
    return min(float(ds[k]) for k in ds.data_vars if math.isfinite(float(ds[k])))


def hand_mh(exact, C=2, S=40, seed=0):
    """Draws from the exact posterior laid out as MH chains (a stand-in that needs no sampler)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(exact.weights.float(), C * S, replacement=True, generator=g)
    n = C * S
    stats = {k: v[idx] for k, v in exact.stats.items()}
    stats.update(accepted=torch.rand(n, generator=g) < 0.3, move=torch.randint(0, 2, (n,), generator=g))
    return Posterior(exact.samples[idx], normalise(torch.zeros(n)), None, "mh", lm=exact.lm, stats=stats,
                     chain=torch.arange(C).repeat_interleave(S), seed=0, wall_time=1.5,
                     info={"acceptance": {"suffix": 0.3, "insert": 0.1}})


def hand_svi(exact, steps=30):
    """An SVI-shaped Posterior: exact draws re-weighted, plus a training trace."""
    post = hand_mh(exact, 1, 200, seed=1)
    post.method, post.kind, post.chain = "svi", Kind.WEIGHTED, torch.zeros(len(post), dtype=torch.long)
    post.stats = {k: v for k, v in post.stats.items() if k not in ("accepted", "move")}
    post.log_weights = normalise(torch.linspace(-1, 1, len(post)))
    post.log_evidence = exact.log_evidence + 0.05
    post.seed, post.wall_time, post.log_evidence_se = 0, 2.0, 0.03
    post.info = Info.from_dict({"trace": {"elbo": np.linspace(-2, exact.log_evidence - 0.1, steps),
                                          "kl_prior": np.linspace(0, 1, steps), "reward:r": np.linspace(0, 1, steps)}})
    return post


@pytest.fixture(scope="module")
def posts(toy):
    lm, model, args, exact = toy
    return {
        "IS": ppl_lm.infer(model, *args, method="importance", num_samples=400, seed=0, progress=False),
        "MH": hand_mh(exact),
        "SVI": hand_svi(exact),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory, posts, toy):
    out = tmp_path_factory.mktemp("rep") / "report"
    path = ppl_lm.report(posts, out, title="Toy <soft> reward", exact=toy[3])
    return out, path


def test_files_and_figures(written):
    out, path = written
    assert path == out.absolute() / "report.html"
    files = sorted(os.listdir(out))
    pngs = {"rewards.png", "weights.png", "trace_MH.png", "rank_MH.png", "svi_SVI.png"}
    assert set(files) == pngs | {"report.html", "summary.md", "summary.json"}
    html = path.read_text(encoding="utf-8")
    md = (out / "summary.md").read_text(encoding="utf-8")
    for f in pngs:
        data = (out / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        # Embedded, byte for byte, so the HTML is viewable offline; and linked to the file.
        assert base64.b64encode(data).decode() in html
        assert f'href="{f}"' in html and f"]({f})" in md
    assert json.loads((out / "summary.json").read_text())["files"][-1] == "report.html"
    # Self-contained: no scripts, no remote resources.
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)
    assert "<h1>Toy &lt;soft&gt; reward</h1>" in html
    assert not list(out.parent.glob(".report.*"))  # the temporary folder is gone


def test_table_values_equal_the_posteriors(written, posts, toy):
    out, path = written
    exact = toy[3]
    html = path.read_text(encoding="utf-8")
    md = (out / "summary.md").read_text(encoding="utf-8")
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert list(rows) == ["exact", "IS", "MH", "SVI"]
    for name, post in {"exact": exact, **posts}.items():
        s, row = D.summary(post), rows[name]
        for key in ("log_evidence", "log_evidence_se", "khat", "rhat", "acceptance", "wall_time"):
            assert row[key] == (pytest.approx(s[key]) if s[key] is not None else None), (name, key)
        # One ESS: Kish's of the weights, or for MCMC the smallest bulk ESS, computed here directly.
        # MCMC's is capped at the draws (these iid stand-in chains give ArviZ 87 for 80), and says so.
        s["ess"] = min(bulk_ess(post), len(post)) if name == "MH" else kish(post)
        assert row["ess"] == pytest.approx(s["ess"]), name
        if name == "MH" and bulk_ess(post) > len(post):
            assert f"capped at the {len(post)} draws" in row["ess_note"] and f"capped at the {len(post)} draws" in html
        assert row["means"] == pytest.approx(s["means"])
        # The same numbers, formatted, in the HTML and Markdown tables.
        if post.log_evidence is not None:
            lz = f"{post.log_evidence:.4f} ± {post.log_evidence_se:.4f}"
            assert lz in html and lz in md
        ess = f"{s['ess']:.1f} ({s['ess'] / len(post):.2f})"
        mean_r = f"{s['means']['reward:r']:.3f}"
        for doc in (html, md):
            assert ess in doc and mean_r in doc
    assert rows["IS"]["khat"] == pytest.approx(posts["IS"].khat)
    assert rows["MH"]["acceptance_moves"] == {"suffix": 0.3, "insert": 0.1}
    # TV to exact: 0 for exact itself, and the same number as the conformance tests compute.
    from toys import tv_distance

    assert rows["exact"]["tv_to_exact"] == 0.0
    assert rows["IS"]["tv_to_exact"] == pytest.approx(tv_distance(posts["IS"], exact))
    assert rows["IS"]["log_evidence_error"] == pytest.approx(posts["IS"].log_evidence - exact.log_evidence)


def test_top_samples_listed(written, posts):
    out, path = written
    html = path.read_text(encoding="utf-8")
    for name, post in posts.items():
        for t in D.top_samples(post, 3):
            assert f"{t['weight']:.4f}" in html
            if t["text"]:
                assert f'<td class="text">{t["text"]}</td>' in html


def test_sample_texts_are_escaped(tmp_path):
    lm = ppl_lm.MarkovLM(torch.zeros(5), torch.zeros(5, 5), eos_id=0,
                         token_strings=["", "<script>", "&", "|x*", "\n"])
    samples = torch.tensor([[1, 2, 3, 4], [2, 0, 0, 0]])
    post = Posterior(samples, torch.tensor([0.7, 0.3]).log(), None, "importance", lm=lm,
                     stats={"reward:r": torch.tensor([1.0, 0.0])})
    path = ppl_lm.report({"IS": post}, tmp_path / "r", top_k=5)
    html = path.read_text(encoding="utf-8")
    assert "<script>" not in html
    assert '&lt;script&gt;&amp;|x*<span class="nl">⏎</span>\n' in html
    md = (tmp_path / "r" / "summary.md").read_text(encoding="utf-8")
    assert "&lt;script&gt;&\\|x\\*⏎" in md and "<script>" not in md


def test_crash_mid_report_leaves_nothing(tmp_path, posts, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("figure failed")

    out = tmp_path / "rep"
    monkeypatch.setattr(R, "fig_mh_rank", boom)  # after rewards, weights and trace are drawn
    with pytest.raises(RuntimeError, match="figure failed"):
        ppl_lm.report({"IS": posts["IS"], "MH": posts["MH"]}, out)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary folder, no half-written file

    # An earlier report in the folder survives a failed rewrite, untouched.
    monkeypatch.undo()
    path = ppl_lm.report({"IS": posts["IS"]}, out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    monkeypatch.setattr(R, "fig_svi", boom)
    with pytest.raises(RuntimeError):
        ppl_lm.report({"SVI": posts["SVI"]}, out)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["rep"]
    assert path.exists()


def test_rewrite_replaces_the_report(tmp_path, posts):
    out = tmp_path / "rep"
    ppl_lm.report({"MH": posts["MH"]}, out)
    assert (out / "trace_MH.png").exists()
    (out / "notes.txt").write_text("mine")
    ppl_lm.report({"IS": posts["IS"]}, out, title="second")
    files = set(os.listdir(out))
    assert "trace_MH.png" not in files and "rank_MH.png" not in files  # stale figures removed
    assert "notes.txt" in files  # files that are not the report's are left alone
    assert "second" in (out / "report.html").read_text()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_single_posterior(tmp_path, posts):
    path = ppl_lm.report(posts["IS"], tmp_path / "one")
    assert "importance" in path.read_text()
    assert not (tmp_path / "one" / "trace_importance.png").exists()


def test_description_and_distinct_figure_names(tmp_path, toy):
    exact = toy[3]
    a, b = hand_mh(exact, 2, 20, seed=1), hand_mh(exact, 2, 20, seed=2)
    path = ppl_lm.report({"chain a": a, "chain_a": b}, tmp_path / "r", description="x < y & z")
    html = path.read_text(encoding="utf-8")
    assert '<p class="desc">x &lt; y &amp; z</p>' in html
    names = set(os.listdir(tmp_path / "r"))
    assert {"trace_chain_a.png", "trace_chain_a_1.png", "rank_chain_a.png", "rank_chain_a_1.png"} <= names
    assert (tmp_path / "r" / "trace_chain_a.png").read_bytes() != (tmp_path / "r" / "trace_chain_a_1.png").read_bytes()


def test_bad_input(tmp_path, posts):
    with pytest.raises(TypeError, match="non-empty dict"):
        ppl_lm.report({}, tmp_path / "x")
    with pytest.raises(TypeError, match="not a ppl_lm.Posterior"):
        ppl_lm.report({"a": 3}, tmp_path / "x")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        ppl_lm.report(posts, f)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_smc_figure_when_backend_exists(tmp_path, toy):
    pytest.importorskip("ppl_lm.inference.smc")
    lm, model, args, exact = toy
    post = ppl_lm.infer(model, *args, method="smc", num_particles=32, seed=0, progress=False)
    ppl_lm.report({"SMC": post}, tmp_path / "smc", exact=exact)
    names = set(os.listdir(tmp_path / "smc"))
    assert "smc_SMC.png" in names and "weights.png" in names
    assert math.isfinite(json.loads((tmp_path / "smc" / "summary.json").read_text())["rows"][1]["ess"])


# -- trust: warnings first, failures listed, one ESS, flags, admissible samples, settings ----------

def stuck_chains(exact, S=40):
    """Two MH chains each stuck on a different sequence: R-hat is far above 1.01."""
    a, b = exact.samples[exact.weights.argmax()], exact.samples[exact.weights.argsort()[-2]]
    post = hand_mh(exact, 2, S)
    post.samples = torch.cat([a.expand(S, -1), b.expand(S, -1)]).clone()
    sa, sb = (int((exact.samples == v).all(-1).nonzero()[0]) for v in (a, b))
    post.stats = {k: torch.cat([v[sa].expand(S), v[sb].expand(S)]).clone() + 0.01 * torch.randn(2 * S,
                  generator=torch.Generator().manual_seed(0)) for k, v in exact.stats.items()}
    return post


def test_warnings_come_first_and_failed_methods_are_listed(tmp_path, posts):
    from ppl_lm.diagnostics import InferenceWarning

    post = posts["IS"]
    post.warnings = [InferenceWarning("khat", "Pareto k-hat is 0.93 > 0.7.", "Use more samples.")]
    try:
        path = ppl_lm.report({"IS": post}, tmp_path / "r", failed={"svi": "ValueError: the guide <diverged>"})
    finally:
        post.warnings = []
    html = path.read_text(encoding="utf-8")
    top = html[: html.index("<h2>Summary</h2>")]
    assert "<h2>Warnings (2)</h2>" in top
    assert "Pareto k-hat is 0.93 &gt; 0.7." in top and "Use more samples." in top
    assert "The run failed: ValueError: the guide &lt;diverged&gt;" in top  # escaped, and first
    md = (tmp_path / "r" / "summary.md").read_text(encoding="utf-8")
    assert md.index("## Warnings") < md.index("## Summary") and "khat" in md and "failed" in md
    warned = json.loads((tmp_path / "r" / "summary.json").read_text())["warnings"]
    assert [(w["backend"], w["code"]) for w in warned] == [("svi", "failed"), ("IS", "khat")]


def test_no_warnings_says_so(tmp_path, toy):
    path = ppl_lm.report({"exact": toy[3]}, tmp_path / "r")
    assert "No warnings: no check on these runs found a problem." in path.read_text(encoding="utf-8")


def test_rhat_above_threshold_is_marked(tmp_path, toy):
    post = stuck_chains(toy[3])
    r = D.rhat(post)
    assert max(r.values()) > 1.5  # the chains did not mix, as built
    path = ppl_lm.report({"MH": post, "ok": hand_mh(toy[3], 4, 1000)}, tmp_path / "r")
    html = path.read_text(encoding="utf-8")
    row = lambda name: re.search(rf"<tr><td>{name}</td>.*?</tr>", html).group(0)  # noqa: E731
    assert f'<td class="num bad">{max(r.values()):.3f} ⚠</td>' in row("MH")
    assert "⚠" not in row("ok")  # 4 chains of 1000 exact draws: R-hat - 1 is about 0.002, far below 0.01


def test_one_ess_and_the_smc_genealogy_count_named_apart(tmp_path, toy):
    lm, model, args, exact = toy
    smc = ppl_lm.infer(model, *args, method="smc", num_particles=64, seed=0, progress=False)
    n_eff = float(smc.info.n_eff_genealogy)
    assert abs(n_eff - kish(smc)) > 0.5  # two different quantities here, so the test can tell them apart
    path = ppl_lm.report({"SMC": smc}, tmp_path / "r")
    html = path.read_text(encoding="utf-8")
    row = json.loads((tmp_path / "r" / "summary.json").read_text())["rows"][0]
    assert row["ess"] == pytest.approx(kish(smc)) and row["n_eff_genealogy"] == pytest.approx(n_eff)
    assert "<th>SMC genealogy n_eff</th>" in html
    assert f"{kish(smc):.1f} ({kish(smc) / len(smc):.2f})" in html and f"<td class=\"num\">{n_eff:.1f}</td>" in html


def test_only_admissible_samples_are_listed(tmp_path):
    lm = ppl_lm.MarkovLM(torch.zeros(4), torch.zeros(4, 4), eos_id=0)
    samples = torch.tensor([[1, 0], [2, 0], [3, 0], [3, 0], [1, 1]])
    lw = torch.tensor([0.0, -math.inf, -math.inf, -math.inf, -1.0])  # three rejected (weight 0)
    post = Posterior(samples, normalise(lw), -1.0, "importance", lm=lm,
                     stats={"reward:r": torch.arange(5.0), "ok:c": torch.tensor([1.0, 0, 0, 0, 1])})
    top = D.top_samples(post, 10)
    assert {t["text"] for t in top} == {"a", "b", "c", "aa"}  # the unfiltered list has the rejected ones
    path = ppl_lm.report({"IS": post}, tmp_path / "r")
    html = path.read_text(encoding="utf-8")
    samples_html = html[html.index("<h2>Samples</h2>"):]
    assert '<td class="text">a</td>' in samples_html and '<td class="text">aa</td>' in samples_html
    assert '<td class="text">b</td>' not in samples_html and '<td class="text">c</td>' not in samples_html
    assert "3 of 5 samples have weight 0 (a hard condition fails) and are not listed." in samples_html
    assert "3 of 5 samples have weight 0" in (tmp_path / "r" / "summary.md").read_text(encoding="utf-8")


def test_settings_are_words_not_internal_keys(tmp_path, toy):
    lm, model, args, exact = toy
    smc = ppl_lm.infer(model, *args, method="smc", num_particles=32, seed=3, progress=False)
    path = ppl_lm.report({"SMC": smc}, tmp_path / "r")
    html = path.read_text(encoding="utf-8")
    settings = html[html.index("<h3>Run settings</h3>"): html.index("<h2>", html.index("<h3>Run settings</h3>"))]
    assert "32 particles" in settings and "seed 3" in settings and "resampling when ESS / N &lt; " in settings
    for key in smc.info:
        if "_" in key:
            assert key not in settings, key  # no internal key such as log_evidence_se_eve or n_eff_genealogy
    assert "=" not in re.sub(r"<[^>]+>", "", settings)


# -- figures ----------------------------------------------------------------------------------------

def _weighted(lm, log_w, **stats):
    n = len(log_w)
    return Posterior(torch.ones(n, 2, dtype=torch.long), normalise(torch.as_tensor(log_w, dtype=torch.float)),
                     0.0, "importance", lm=lm, stats={k: torch.as_tensor(v, dtype=torch.float) for k, v in stats.items()})


def test_equal_weights_get_a_readable_log_axis(toy):
    post = _weighted(toy[0], torch.zeros(16), length=torch.full((16,), 2.0))
    fig = R.fig_weights({"smc": post})
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= 0.1 and hi >= 10  # at least one decade on each side of the uniform weight 1
    line = [ln for ln in ax.get_lines() if ln.get_label().startswith("smc")][0]
    assert "(equal weights)" in line.get_label() and line.get_marker() == "o"


def test_no_bar_for_an_infinite_or_missing_khat(toy):
    a = _weighted(toy[0], torch.zeros(8))
    a.khat = -math.inf
    b = _weighted(toy[0], torch.linspace(-3, 0, 8))
    b.method = "smc"
    assert D.psis_khat(b) is None  # 8 samples: too few to fit a tail
    fig = R.fig_weights({"IS": a, "SMC": b})
    ax = fig.axes[1]
    solid = [p for p in ax.patches if p.get_hatch() is None]
    assert solid == []  # neither k-hat is a number: no solid bar, in particular none down to -1
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["IS\n(k-hat — (tied weights))", "SMC\n(k-hat —)"]  # "—", never "−∞"
    assert not [t for t in ax.texts if t.get_text() == "n/a"]
    assert ax.get_ylim()[0] >= 0


def test_real_values_are_histograms_and_constants_take_no_panel(toy):
    post = _weighted(toy[0], torch.zeros(12), log_prior=[-1.23, -4.56, -7.89] * 4, length=torch.full((12,), 2.0),
                     **{"reward:k": [0, 1, 2, 1] * 3})
    fig = R.fig_rewards({"IS": post})
    shown = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(shown) == {"reward:k", "log_prior"}  # length is 2 everywhere: no panel
    assert [t.get_text() for t in shown["reward:k"].get_xticklabels()] == ["0", "1", "2"]  # integers: bars
    ticks = {t.get_text() for t in shown["log_prior"].get_xticklabels()}
    assert not ticks & {"-1.23", "-4.56", "-7.89"}  # a real quantity is not drawn as categories
    caption = R._constants_caption({"IS": post}, None)
    assert "length = 2" in caption
