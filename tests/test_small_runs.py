"""Small runs say so: a ``too_few_draws`` warning, "—" with the reason instead of a fake error bar,
MH's ESS capped at its draws, advice that fits the run, a verdict line and an error-vs-exact column.

Each case is a run the issue saw look clean (or print a meaningless number), on the toy
soft-reward and hard-constraint problems of ``toys``, fixed seeds.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch

import ppl_lm
from ppl_lm import Posterior
from ppl_lm import diagnostics as D
from ppl_lm.cli import _print_run
from ppl_lm.diagnostics.warnings import PplLmWarning, diagnose
from ppl_lm.posterior import normalise
from toys import LMS, hard_constraint, soft_reward


def infer(model, method, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PplLmWarning)
        return ppl_lm.infer(model, method=method, progress=False, **options)


def printed(post) -> str:
    out = io.StringIO()
    _print_run(post.method, post, 0, out=out)
    return out.getvalue()


def codes(post) -> list[str]:
    return [w.code for w in post.warnings]


@pytest.fixture(scope="module")
def soft():
    return soft_reward(LMS["markov"]())[0]


@pytest.fixture(scope="module")
def exact(soft):
    return infer(soft, "exact")


def test_a_short_svi_run_warns_with_svi_advice(soft):
    """5 steps, 16 draws: before, "No warnings"."""
    post = infer(soft, "svi", num_steps=5, num_particles=4, num_samples=16, seed=0)
    w = next(w for w in post.warnings if w.code == "too_few_draws")
    assert "16 draws" in w.message and "num_steps" in w.fix and "method='svi'" not in w.fix
    assert "can be trusted: no — too few draws (16 draws" in printed(post)


def test_importance_below_the_floor_warns_and_above_it_does_not(soft):
    small = infer(soft, "importance", num_samples=50, seed=0)
    assert codes(small) == ["too_few_draws"] and "num_samples" in small.warnings[0].fix
    big = infer(soft, "importance", num_samples=4000, seed=0)
    assert D.effective_draws(big) > 100 and codes(big) == []
    assert "can be trusted: yes" in printed(big)


def test_smc_low_ess_advice_does_not_say_use_smc(soft):
    """SMC that never resamples: its weights degenerate (ESS 18 of 200)."""
    post = infer(soft, "smc", num_particles=200, ess_threshold=0.0, seed=0)
    w = next(w for w in post.warnings if w.code in ("too_few_draws", "low_ess"))
    assert "method='smc'" not in w.fix and "num_particles" in w.fix


def test_advice_follows_the_run_fields_not_the_method_name():
    """The same weights get particle advice with ancestors, proposal advice without, whatever
    ``method`` says; 400 draws worth about 50 is ``low_ess``."""
    n = 400
    lw = torch.where(torch.arange(n) < 50, 0.0, -math.inf).double()
    base = dict(samples=torch.arange(n)[:, None] % 7 + 1, log_weights=normalise(lw), log_evidence=0.0,
                method="custom")
    resampled = Posterior(**base, ancestor=torch.arange(n))
    independent = Posterior(**base)
    for post in (resampled, independent):
        assert [w.code for w in diagnose(post)] == ["low_ess"]
    assert "num_particles" in diagnose(resampled)[0].fix and "method='smc'" not in diagnose(resampled)[0].fix
    assert "method='smc'" in diagnose(independent)[0].fix


def test_one_ancestor_gives_no_error_bar(soft):
    """Every particle descends from one: the genealogy se is exactly 1.0 whatever the truth."""
    post = infer(soft, "smc", num_particles=6, ess_threshold=1.0, seed=1)
    assert post.info.num_eves == 1 and post.log_evidence_se == pytest.approx(1.0)  # the fake bar, as computed
    s = D.summary(post)
    assert s["log_evidence_se"] is None and "1 ancestor" in s["log_evidence_se_reason"]
    text = printed(post)
    assert "± 1.0000" not in text and "± — (path degeneracy: 1 ancestor" in text
    assert "can be trusted: no — path degeneracy, 1 ancestor" in text


def test_tied_weights_show_no_khat(tmp_path):
    """Prior IS under a hard constraint: every admissible weight is equal, k-hat is -inf (no tail)."""
    model, _ = hard_constraint(LMS["markov"]())
    post = infer(model, "importance", num_samples=200, seed=0)
    assert post.khat == -math.inf
    s = D.summary(post)
    assert s["khat"] is None and "tied" in s["khat_reason"]
    text = printed(post)
    assert "inf" not in text and "k-hat — (the largest weights are tied" in text
    html = ppl_lm.report({"IS": post}, tmp_path / "r").read_text(encoding="utf-8")
    assert "−∞" not in html and "no tail to fit" in html


def test_mh_ess_is_capped_at_its_draws():
    """Anti-correlated chains: ArviZ's bulk ESS exceeds the draws; ppl-lm shows the draws and why."""
    C, S = 4, 50
    v = np.tile(np.array([0.0, 1.0]), (C, S // 2)) + np.random.default_rng(0).normal(0, 0.01, (C, S))
    n = C * S
    stats = {"v": torch.tensor(v.reshape(-1)).float(), "log_prior": torch.zeros(n), "log_likelihood": torch.zeros(n)}
    _, ess = D.mcmc_diagnostics({"v": v})
    post = Posterior(torch.ones(n, 2, dtype=torch.long), normalise(torch.zeros(n)), None, "mh", stats=stats,
                     chain=torch.arange(C).repeat_interleave(S), bulk_ess=ess["v"])
    assert ess["v"] > n  # ArviZ's own number: more than the draws
    assert post.ess == n and D.summary(post)["ess"] == n
    assert f"capped at the {n} draws" in D.summary(post)["ess_note"]


def test_report_has_verdicts_and_an_error_vs_exact_column(tmp_path, soft, exact):
    good = infer(soft, "importance", num_samples=4000, seed=0)
    # A planted bug: the same draws with their weights dropped (the prior's law, not the posterior).
    bad = Posterior(good.samples, normalise(torch.zeros(len(good))), good.log_evidence, "importance",
                    lm=good.lm, stats=good.stats, info=good.info, khat=0.1)
    out = ppl_lm.report({"IS": good, "unweighted": bad}, tmp_path / "r", exact=exact)
    html = out.read_text(encoding="utf-8")
    assert "<th>error vs exact</th>" in html and "can be trusted: yes (exact enumeration)" in html
    rows = {r["name"]: r for r in json.loads((tmp_path / "r" / "summary.json").read_text())["rows"]}
    ref = D.weighted_mean(exact, exact.stats["length"])
    err = rows["IS"]["error_vs_exact"]["length"]
    assert err["error"] == pytest.approx(D.weighted_mean(good, good.stats["length"]) - ref)
    # Within 4 Monte Carlo sd when right; far outside when the weights are dropped.
    assert all(abs(e["sd"]) < 4 for e in rows["IS"]["error_vs_exact"].values())
    assert max(abs(e["sd"]) for e in rows["unweighted"]["error_vs_exact"].values()) > 4
    assert rows["exact"]["error_vs_exact"] is None
    md = (tmp_path / "r" / "summary.md").read_text(encoding="utf-8")
    assert "## Verdict" in md and "**IS**: can be trusted: yes" in md

