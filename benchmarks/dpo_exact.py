"""DPO against exact answers on an enumerable toy: what each way of learning from preferences targets.

Problem (issue 20, item 4): the conformance Markov LM (vocabulary 5, ``tests/toys.py``, seed 3)
with 2 new tokens, 21 texts. A Bradley–Terry rater (temperature 1) with utility
u(x) = θ*·φ(x), φ = (count of token 2, count of token 3), θ* = (1, −0.5), compares pairs of prior
draws (``ppl_lm.preferences.simulate_preferences``). β = 0.5. With two positions the ``full``
guide can be any distribution over the 21 texts, so the DPO optimum over the guide family is
the one over all distributions (``exact_dpo_optimum``).

Distributions compared, all exact by enumeration (except the SVI-trained guide, itself
enumerated):

- ``DPO*``: the exact minimiser of the DPO loss (π·e^{r̂/β}, r̂ the free maximum-likelihood
  Bradley–Terry reward per text seen in a pair; unseen texts keep q/π of the rest's mean);
- ``DPO (svi)``: ``ppl_lm.infer(model, method="svi", objective="dpo", preferences=...)``, full
  batch, 300 steps, the guide's own distribution;
- ``RLHF (MAP)``: π·e^{r_MAP/β}/Z, r_MAP = θ_MAP·φ (``fit_reward(method="map")``, N(0, 1) prior);
- ``mean``, ``marginal``, ``mixture``: ``learned_reward``'s three conditionals under NUTS draws of θ
  (``fit_reward(method="nuts")``, 2 × 500 draws);
- ``truth``: π·e^{u/β}/Z.

Four experiments: (1) the KL matrix among them for one data set; (2) KL to the truth by data
size over seeds; (3) where DPO departs: pairs that never show two texts (held out), and data
whose DPO loss has no minimum (SVI's guide drifts with training length); (4) ambiguous raters
(item 5): ``models/data/ambiguous_prefs.jsonl`` ("kinder world" and "restricted text" explain it
equally), the exact posterior of θ against NUTS and MAP, and what each conditional does to the two
probe texts.

    python benchmarks/dpo_exact.py            # about 10 minutes on one thread
    python benchmarks/dpo_exact.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import pyro
import torch

import ppl_lm
from ppl_lm.diagnostics.warnings import PplLmWarning
from ppl_lm.inference.exact import enumerate_sequences
from ppl_lm.inference.svi.dpo import exact_dpo_optimum

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from toys import (  # noqa: E402
    LMS, PREF_BETA, PREF_T, PREF_THETA, kl_logp, pref_features, pref_model, pref_utility, support_index,
)

T, BETA, THETA = PREF_T, PREF_BETA, PREF_THETA
features, utility, kl = pref_features, pref_utility, kl_logp
LM = LMS["markov"]()
XS = enumerate_sequences(LM.vocab_size, LM.eos_id, T)
LOG_PI = LM.sequence([], max_new_tokens=T).log_prob(XS).double()
TRUTH = torch.log_softmax(LOG_PI + utility(XS) / BETA, 0)
model = pref_model(LM)


def index(y: torch.Tensor) -> torch.Tensor:
    return support_index(XS, y)


def svi_dpo(prefs, num_steps: int) -> torch.Tensor:
    """The SVI-trained DPO guide's distribution over the support (its weighted draws' warnings are
    about the correction toward the truth, not this table)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PplLmWarning)
        post = ppl_lm.infer(model, method="svi", objective="dpo", preferences=prefs, batch_size=len(prefs),
                            num_steps=num_steps, num_samples=100, crosscheck_samples=0, seed=0, progress=False)
    with torch.no_grad():
        return post.guide.lm.sequence([], max_new_tokens=T).log_prob(XS).double()


def tilted(r: torch.Tensor) -> torch.Tensor:
    """log π·e^{r/β}/Z over the support (r ``[M]``)."""
    return torch.log_softmax(LOG_PI + r / BETA, 0)


def conditionals(prefs, nuts_samples: int, svi_steps: int | None) -> dict[str, torch.Tensor | None]:
    c, r = index(prefs.chosen), index(prefs.rejected)
    out: dict[str, torch.Tensor | None] = {}
    try:
        out["DPO*"] = exact_dpo_optimum(LOG_PI, c, r, BETA)
    except ValueError:
        out["DPO*"] = None  # no minimum
    if svi_steps:
        out["DPO (svi)"] = svi_dpo(prefs, svi_steps)
    rm_map = ppl_lm.fit_reward(prefs, features, method="map", num_steps=1500, seed=0)
    out["RLHF (MAP)"] = tilted(rm_map.reward(XS))
    rm = ppl_lm.fit_reward(prefs, features, method="nuts", num_samples=nuts_samples, warmup_steps=nuts_samples,
                           seed=0)
    r_s = rm.reward(XS, rm.samples)  # [S, M]
    out["mean"] = tilted(rm.reward(XS))
    out["marginal"] = tilted(BETA * (torch.logsumexp(r_s / BETA, 0) - math.log(len(r_s))))
    per_theta = torch.log_softmax(LOG_PI + r_s / BETA, -1)  # each θ's RLHF optimum
    out["mixture"] = torch.logsumexp(per_theta, 0) - math.log(len(r_s))
    out["truth"] = TRUTH
    out["_theta"] = rm.mean, rm.samples.std(0), rm_map.samples[0]
    return out


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def matrix(dists: dict) -> str:
    names = [k for k, v in dists.items() if not k.startswith("_") and v is not None]
    lines = ["| KL(row ‖ col) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(fmt(kl(dists[a], dists[b])) for b in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    nuts = 50 if a.smoke else 500
    steps = 20 if a.smoke else 300
    sizes = [1000] if a.smoke else [1000, 3000, 10000]
    seeds = 1 if a.smoke else a.seeds
    t0 = time.time()

    print(f"## 1. Every pair of answers, n = 1000 pairs (seed 0); π's mass on the texts: min {LOG_PI.exp().min():.4f}")
    prefs = ppl_lm.preferences.simulate_preferences(LM, [], utility, 1000, T, seed=0)
    d = conditionals(prefs, nuts, steps)
    th_mean, th_sd, th_map = d["_theta"]
    print(f"θ: NUTS mean {th_mean.tolist()} sd {th_sd.tolist()}; MAP {th_map.tolist()}; true {THETA.tolist()}\n")
    print(matrix(d))

    print("\n## 2. KL to the truth π·e^{u/β}/Z by data size (mean ± sd over seeds; DPO* counts only seeds "
          "where it exists)\n")
    rows = {}
    for n in sizes:
        per: dict[str, list[tuple[float, float]]] = {}
        none = 0
        for s in range(seeds):
            pr = ppl_lm.preferences.simulate_preferences(LM, [], utility, n, T, seed=100 + s)
            dd = conditionals(pr, nuts, None)
            none += dd["DPO*"] is None
            for k, v in dd.items():
                if not k.startswith("_") and k != "truth" and v is not None:
                    per.setdefault(k, []).append((kl(v, TRUTH), kl(TRUTH, v)))
        rows[n] = (per, none)
    names = ["DPO*", "RLHF (MAP)", "mean", "marginal", "mixture"]
    print("| n pairs | " + " | ".join(f"{k}: KL(q‖π′_u) / KL(π′_u‖q)" for k in names) + " | DPO* has no minimum |")
    print("|---" * (len(names) + 2) + "|")
    for n, (per, none) in rows.items():
        cells = []
        for k in names:
            v = torch.tensor(per.get(k, []), dtype=torch.float64)
            if not len(v):
                cells.append("—")
                continue
            m, sd = v.mean(0), (v.std(0) if len(v) > 1 else torch.zeros(2))
            cells.append(f"{m[0]:.4f} ± {sd[0]:.4f} / {m[1]:.4f} ± {sd[1]:.4f}")
        print(f"| {n} | " + " | ".join(cells) + f" | {none} of {seeds} |")

    print("\n## 3a. Texts never shown to the rater: pairs with [2, 2] or [3, 3] dropped (n = 1000 before)\n")
    held = [XS.tolist().index([2, 2]), XS.tolist().index([3, 3])]
    c, r = index(prefs.chosen), index(prefs.rejected)
    keep = ~(torch.isin(c, torch.tensor(held)) | torch.isin(r, torch.tensor(held)))
    sub = ppl_lm.Preferences(prefs.chosen[keep], prefs.rejected[keep])
    dh = conditionals(sub, nuts, steps)
    print(f"{int(keep.sum())} pairs kept. Mass on [2, 2] / [3, 3]:\n")
    print("| | π | " + " | ".join(k for k in dh if not k.startswith("_") and dh[k] is not None) + " |")
    print("|---" * (2 + sum(1 for k in dh if not k.startswith("_") and dh[k] is not None)) + "|")
    for i, name in zip(held, ("[2, 2]", "[3, 3]")):
        print(f"| {name} | {LOG_PI[i].exp():.4f} | " + " | ".join(
            f"{float(v[i].exp()):.4f}" for k, v in dh.items() if not k.startswith("_") and v is not None) + " |")
    print("\nKL to the truth (q‖π′_u / π′_u‖q): " + "; ".join(
        f"{k} {kl(v, TRUTH):.4f} / {kl(TRUTH, v):.4f}" for k, v in dh.items()
        if not k.startswith("_") and k != "truth" and v is not None))

    print("\n## 3b. Pairs whose DPO loss has no minimum (n = 300, seed 0): SVI's guide by training length\n")
    small = ppl_lm.preferences.simulate_preferences(LM, [], utility, 300, T, seed=0)
    try:
        exact_dpo_optimum(LOG_PI, index(small.chosen), index(small.rejected), BETA)
        print("(this data set has a minimum)")
    except ValueError as err:
        print(f"exact: {err}\n")
    rm_map = ppl_lm.fit_reward(small, features, method="map", num_steps=1500, seed=0)
    q_map = tilted(rm_map.reward(XS))
    print("| svi steps | KL(q‖π′_u) | KL(π′_u‖q) | max q(x) | RLHF (MAP) KL(q‖π′_u) |")
    print("|---|---|---|---|---|")
    for n_steps in ([20, 40] if a.smoke else [150, 600, 2400]):
        lq = svi_dpo(small, n_steps)
        print(f"| {n_steps} | {kl(lq, TRUTH):.4f} | {kl(TRUTH, lq):.4f} | {float(lq.exp().max()):.4f} | "
              f"{kl(q_map, TRUTH):.4f} |")
    ambiguous(nuts, steps)
    print(f"\n({time.time() - t0:.0f} s)")


def ambiguous(nuts: int, steps: int, beta: float = 1.0) -> None:
    """Experiment 4: the ambiguous raters' pairs, exact θ posterior and the probes under each conditional."""
    from ppl_lm.models import preferences as mp

    toy = mp.ambiguous_raters()
    T3, lm = toy.max_new_tokens, toy.lm
    prefs = ppl_lm.Preferences.from_jsonl(mp.AMBIGUOUS_DATA)
    c, r = prefs.tokens(lm, T3)
    xs = enumerate_sequences(lm.vocab_size, lm.eos_id, T3)
    log_pi = lm.sequence([], max_new_tokens=T3).log_prob(xs).double()
    g = torch.linspace(-4, 4, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    delta = toy.features(c) - toy.features(r)
    post = torch.softmax(-0.5 * (grid**2).sum(-1) + torch.nn.functional.logsigmoid(grid @ delta.T).sum(-1), 0)
    side = grid[:, 1] - 2 * grid[:, 0]  # r(kinder probe) − r(restricted probe) under θ
    rm = ppl_lm.fit_reward(prefs, toy.features, method="nuts", lm=lm, max_new_tokens=T3, num_samples=nuts,
                           warmup_steps=nuts, seed=0)
    rm_map = ppl_lm.fit_reward(prefs, toy.features, method="map", lm=lm, max_new_tokens=T3, num_steps=1500, seed=0)
    th = rm.samples
    print(f"\n## 4. Ambiguous raters: {len(prefs)} pairs of `models/data/ambiguous_prefs.jsonl`, β = {beta}\n")
    print(f"P(θ favours the kinder probe, θ_e > 2·θ_w): exact (grid) {float((post * (side > 0)).sum()):.3f}, "
          f"NUTS {float(((th[:, 1] - 2 * th[:, 0]) > 0).double().mean()):.3f} ({len(th)} draws); posterior mean "
          f"θ = {[round(v, 3) for v in rm.mean.tolist()]}, sd {[round(v, 3) for v in th.std(0).tolist()]} "
          f"(wording, events); MAP θ = {[round(v, 3) for v in rm_map.samples[0].tolist()]} "
          f"(θ_e − 2·θ_w = {float(rm_map.samples[0, 1] - 2 * rm_map.samples[0, 0]):.3f}: the restricted side)\n")

    def tilt(rr):
        return torch.log_softmax(log_pi + rr / beta, 0)

    r_s = rm.reward(xs, rm.samples)
    dists = {"π (prior)": log_pi, "truth: kinder world": tilt(toy.kinder(xs)),
             "truth: restricted text": tilt(toy.restricted(xs)), "RLHF (MAP)": tilt(rm_map.reward(xs)),
             "mean": tilt(rm.reward(xs)), "marginal": tilt(beta * (torch.logsumexp(r_s / beta, 0) - math.log(len(r_s)))),
             "mixture": torch.logsumexp(torch.log_softmax(log_pi + r_s / beta, -1), 0) - math.log(len(r_s))}

    def model_mean():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T3))
        ppl_lm.learned_reward("rm", rm, x, beta, uncertainty="mean")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PplLmWarning)
        g_dpo = ppl_lm.infer(model_mean, method="svi", objective="dpo", preferences=prefs, batch_size=len(prefs),
                             num_steps=steps, num_samples=100, crosscheck_samples=0, seed=0, progress=False).guide
    with torch.no_grad():
        dists["DPO (svi)"] = g_dpo.lm.sequence([], max_new_tokens=T3).log_prob(xs).double()
    k, rs = (int((xs == toy.probe(n)).all(-1).nonzero()) for n in ("kinder", "restricted"))
    has = {n: (xs == mp.PROBES[n]).any(-1) for n in ("kinder", "restricted")}
    print("| conditional | q/π: \"A neighbour helped us.\" | q/π: \"The records were neatly and properly kept.\" | "
          "log-odds shift kinder − restricted | mass on texts with the kinder / restricted sentence |")
    print("|---|---|---|---|---|")
    for name, lq in dists.items():
        a, b = float((lq[k] - log_pi[k]).exp()), float((lq[rs] - log_pi[rs]).exp())
        print(f"| {name} | {a:.3f} | {b:.3f} | {math.log(a / b):+.3f} | {float(lq[has['kinder']].exp().sum()):.3f} / "
              f"{float(lq[has['restricted']].exp().sum()):.3f} |")


if __name__ == "__main__":
    main()
