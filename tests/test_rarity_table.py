"""benchmarks/rarity.py, the rare-event table (issue 21 item 7): its exact p and its smoke run.

- The table's "exact" log p of a pinned prefix is the sum of the pinned tokens' next-token
  log-probabilities (``lm.score``); it must equal ``method="exact"`` (enumeration) on the toy, or
  every log-Z error in the table is measured against the wrong number. A planted bug (the path
  scored one token short) fails the same check.
- ``python benchmarks/rarity.py --smoke`` runs every toy column (training included) and writes its
  JSON line; prior importance sampling's ESS/N is hits/N, within binomial error of p.
"""

from __future__ import annotations

import json
import math

import pytest
from toys import load_benchmark

import ppl_lm


@pytest.fixture(scope="module")
def rarity():
    return load_benchmark("rarity")


def toy():
    return ppl_lm.MarkovLM.random(8, eos_id=0, seed=11, scale=1.0)


@pytest.mark.parametrize("short", [False, True], ids=["correct", "planted-bug"])
def test_pinned_log_p_is_exact(rarity, short):
    lm = toy()
    path = rarity.decade_path(lm, [1], 4)
    for k in range(1, 5):
        pins = {i: path[i] for i in range(k)}
        exact = ppl_lm.infer(rarity.pinned_model(lm, [1], 5, pins), [1], method="exact", progress=False).log_evidence
        log_p = rarity.log_p_of(lm, [1], path[: k - 1] if short else path[:k])
        assert (abs(exact - log_p) < 1e-5) != short  # lm.score is float32, (k, exact, log_p)
    # one decade per pinned token, as the table's rows need (p_k / p_{k-1} near 0.1)
    steps = [rarity.log_p_of(lm, [1], path[:k]) - rarity.log_p_of(lm, [1], path[: k - 1]) for k in range(1, 5)]
    assert all(math.log(0.05) < s < math.log(0.2) for s in steps), steps


def test_smoke_run_writes_the_table(rarity, tmp_path, monkeypatch):
    monkeypatch.setattr(rarity._bench, "OUT_DIR", str(tmp_path))
    rarity.main(["--smoke", "--threads", "1"])
    out = json.loads((tmp_path / "rarity_markov.jsonl").read_text().splitlines()[-1])
    assert [r["k"] for r in out["rows"]] == [1, 3]
    for r in out["rows"]:
        assert set(r["cols"]) == {"is", "smc", "smc_twist", "guide_is", "smc_guide"}
        s, n = r["cols"]["is"], out["N"]
        assert abs(s["ess_over_n"] - r["p"]) < 4 * math.sqrt(r["p"] * (1 - r["p"]) / n / s["runs"]) + 1.5 / n
        for c in ("smc_twist", "guide_is", "smc_guide"):
            assert r["cols"][c]["train_s"] > 0
