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
from ppl_lm.posterior import Posterior, normalise
from toys import PROBLEMS, markov_lm

R = importlib.import_module("ppl_lm.reporting.figures")  # the figure functions


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def toy():
    lm = markov_lm()
    model, args = PROBLEMS["soft_reward"](lm)
    exact = ppl_lm.infer(model, *args, method="exact")
    return lm, model, args, exact


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
    post.method, post.chain = "svi", torch.zeros(len(post), dtype=torch.long)
    post.stats = {k: v for k, v in post.stats.items() if k not in ("accepted", "move")}
    post.log_weights = normalise(torch.linspace(-1, 1, len(post)))
    post.log_evidence = exact.log_evidence + 0.05
    post.seed, post.wall_time, post.log_evidence_se = 0, 2.0, 0.03
    post.info = {"trace": {"elbo": np.linspace(-2, exact.log_evidence - 0.1, steps),
                           "kl_prior": np.linspace(0, 1, steps), "reward:r": np.linspace(0, 1, steps)}}
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
        for key in ("log_evidence", "log_evidence_se", "ess", "khat", "rhat", "acceptance", "wall_time"):
            assert row[key] == (pytest.approx(s[key]) if s[key] is not None else None), (name, key)
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
