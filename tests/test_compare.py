"""ppl_lm.diagnostics.compare: backends whose log Z estimates disagree beyond their errors.

The failing case is a run built to fail: importance sampling from the prior on a reward that
only a sequence of prior probability 3^-8 earns. With 32 samples it almost never sees that
sequence (probability 0.4% per seed), so every weight is equal and it reports
log Z = 0 ± 0, while the exact answer, by enumeration, is about 11.2.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pyro
import pytest
import torch

import ppl_lm
from ppl_lm.diagnostics.compare import DISAGREEMENT_Z, disagreeing_backends

T = 8
BONUS = 20.0


def rare_bonus():
    lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)  # uniform: P(x = 2…2) = 3^-8

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.reward("all_b", BONUS * (x == 2).all(-1).float(), beta=1.0)

    return model


def exact_log_z() -> float:
    p = 3.0 ** -T
    return math.log(1 - p + p * math.exp(BONUS))


@pytest.fixture(scope="module")
def exact():
    post = ppl_lm.infer(rare_bonus(), method="exact")
    assert post.log_evidence == pytest.approx(exact_log_z(), abs=1e-4)  # the reference is right
    return post


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_importance_that_misses_the_mass_disagrees_with_exact(exact, seed):
    post = ppl_lm.infer(rare_bonus(), method="importance", num_samples=32, seed=seed, progress=False)
    assert post.log_evidence < exact.log_evidence - 5  # the run failed, as built
    found = disagreeing_backends({"exact": exact, "importance": post})
    assert [w.code for w in found] == ["disagreeing_backends"]
    assert "exact 11.2" in found[0].message and "importance" in found[0].message
    assert "trust none until they agree" in found[0].fix


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_sound_runs_agree(seed):
    """Importance with enough samples on a mild reward: its standard error is honest, so no alarm."""
    lm = ppl_lm.MarkovLM.random(4, eos_id=0, seed=1)

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=4))
        ppl_lm.reward("r", (x == 2).float().sum(-1), beta=2.0)

    ex = ppl_lm.infer(model, method="exact")
    a = ppl_lm.infer(model, method="importance", num_samples=2000, seed=seed, progress=False)
    b = ppl_lm.infer(model, method="smc", num_particles=500, seed=seed + 100, progress=False)
    assert disagreeing_backends({"exact": ex, "importance": a, "smc": b}) == []


def shifted(post, by: float):
    """A planted bug: the same run with its log Z off by ``by``."""
    return dataclasses.replace(post, log_evidence=post.log_evidence + by, info=dict(post.info),
                               warnings=list(post.warnings))


def test_threshold_is_in_combined_standard_errors():
    lm = ppl_lm.MarkovLM.random(4, eos_id=0, seed=1)

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=4))
        ppl_lm.reward("r", (x == 2).float().sum(-1), beta=2.0)

    a = ppl_lm.infer(model, method="importance", num_samples=500, seed=0, progress=False)
    se = a.log_evidence_se
    combined = math.sqrt(2) * se
    assert disagreeing_backends({"a": a, "b": shifted(a, (DISAGREEMENT_Z - 0.5) * combined)}) == []
    found = disagreeing_backends({"a": a, "b": shifted(a, (DISAGREEMENT_Z + 0.5) * combined)})
    assert len(found) == 1 and "standard errors apart" in found[0].message


def test_backends_without_log_z_or_error_are_left_out(exact):
    mh = dataclasses.replace(exact, method="mh", log_evidence=None)
    assert disagreeing_backends({"exact": exact, "mh": mh}) == []


def test_report_shows_the_disagreement_first(tmp_path, exact):
    bad = ppl_lm.infer(rare_bonus(), method="importance", num_samples=32, seed=0, progress=False)
    path = ppl_lm.report({"importance": bad}, tmp_path / "r", exact=exact)
    html = path.read_text(encoding="utf-8")
    top = html[: html.index("<h2>Summary</h2>")]
    assert re.search(r"<h2>Warnings \(\d+\)</h2>", top) and "disagreeing_backends" in top
