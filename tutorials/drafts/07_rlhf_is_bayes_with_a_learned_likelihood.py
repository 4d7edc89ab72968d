# %% [markdown]
# # 7. RLHF is Bayes with a learned likelihood
#
# **Claim.** Fine-tuning on human preferences is conditioning on a likelihood learned from the
# preferences. A Bradley–Terry reward r_θ fitted to pairs gives the conditional
# $\pi'(x) \propto \pi(x)\,e^{r_\theta(x)/\beta}$; the reward is uncertain, and how that uncertainty
# enters ("mean", "marginal", "mixture") changes what the conditional does to texts the raters
# never saw. DPO skips the reward model and fits the guide to the pairs directly.
#
# This is a start: the exact toy part only (every number below is exact by enumeration, or
# checked against it). The SmolLM2 part (200–500 simulated pairs; MAP-reward RLHF, "marginal",
# "mixture" and DPO; the probe shifts of tutorials 5 and 6) is still to be written.

# %%
import math
import os
import warnings

import pyro
import torch

import ppl_lm
from ppl_lm.diagnostics.warnings import PplLmWarning
from ppl_lm.inference.exact import enumerate_sequences
from ppl_lm.inference.svi.dpo import exact_dpo_optimum
from ppl_lm.models import preferences as mp

SMOKE = ppl_lm.notebook.setup()  # one torch thread (PPL_LM_THREADS), smoke mode (PPL_LM_SMOKE=1)
warnings.simplefilter("ignore", PplLmWarning)

# %% [markdown]
# ## The ambiguous raters
#
# Texts are up to three sentences. Raters are shown texts in which every good deed comes in two
# pleasant words, so "raters like good deeds" (kinder world) and "raters like pleasant words"
# (restricted text) are the same utility on every shown text: the pairs cannot tell them apart.
# Two probe sentences, never shown, separate them.

# %%
toy = mp.ambiguous_raters()
T, BETA = toy.max_new_tokens, 1.0
prefs = ppl_lm.Preferences.from_jsonl(mp.AMBIGUOUS_DATA)
xs = enumerate_sequences(toy.lm.vocab_size, toy.lm.eos_id, T)
log_pi = toy.lm.sequence([], max_new_tokens=T).log_prob(xs).double()
print(len(prefs), "pairs, e.g.", prefs.chosen[0], ">", prefs.rejected[0])

# %% [markdown]
# ## The reward's posterior keeps both explanations; MAP picks one
#
# r_θ(x) = θ_w·wording + θ_e·events. The pairs fix only 2θ_w + θ_e; the rest is the prior's.

# %%
n = 100 if SMOKE else 500
rm = ppl_lm.fit_reward(prefs, toy.features, method="nuts", lm=toy.lm, max_new_tokens=T, num_samples=n,
                       warmup_steps=n, seed=0)
rm_map = ppl_lm.fit_reward(prefs, toy.features, method="map", lm=toy.lm, max_new_tokens=T, seed=0)
kinder_side = float(((rm.samples[:, 1] - 2 * rm.samples[:, 0]) > 0).double().mean())
print(f"NUTS: P(the kinder explanation's side) = {kinder_side:.2f}; MAP θ = {rm_map.samples[0].tolist()}")
assert 0.1 < kinder_side < 0.9  # both explanations kept (the exact value is 0.30: tests/test_preferences.py)
assert float(rm_map.samples[0, 1] - 2 * rm_map.samples[0, 0]) < 0  # MAP: the restricted side

# %% [markdown]
# ## What each conditional does to the probes (exact enumeration)

# %%
log_z = rm.log_normalizers(toy.lm, [], T, BETA)
probe = {name: tuple(toy.probe(name).tolist()) for name in ("kinder", "restricted")}
for mode in ("mean", "marginal", "mixture"):
    def model(mode=mode):
        x = pyro.sample("x", toy.lm.sequence([], max_new_tokens=T))
        ppl_lm.learned_reward("rm", rm, x, BETA, uncertainty=mode, log_normalizers=log_z if mode == "mixture" else None)

    p = ppl_lm.infer(model, method="exact", progress=False).probabilities()
    shift = math.log(p[probe["kinder"]] / p[probe["restricted"]])
    print(f"{mode:>8}: log-odds shift, kinder probe vs restricted probe = {shift:+.3f} "
          "(kinder world +1.5, restricted text -1.5)")

# %% [markdown]
# ## DPO against its exact optimum
#
# On the 21-text toy of the tests (two tokens: the "full" guide can be any distribution), SVI with
# `objective="dpo"` reaches the exact minimiser of the DPO loss; that minimiser is farther from the
# true-utility posterior than RLHF under the fitted reward (`benchmarks/dpo_exact.py`).

# %%
lm = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)
T2, B2 = 2, 0.5
THETA = torch.tensor([1.0, -0.5], dtype=torch.float64)
xs2 = enumerate_sequences(5, 0, T2)
lp2 = lm.sequence([], max_new_tokens=T2).log_prob(xs2).double()


def u(x):
    """The rater's utility: θ*·(count of token 2, count of token 3)."""
    return torch.stack([(x == 2).double().sum(-1), (x == 3).double().sum(-1)], -1) @ THETA


def truth_model():
    x = pyro.sample("x", lm.sequence([], max_new_tokens=T2))
    ppl_lm.reward("u", u(x).float(), beta=B2)


def idx(y):
    return (y[:, None, :] == xs2[None]).all(-1).long().argmax(-1)


def kl(a, b):
    return float((a.exp() * (a - b)).sum())


pairs = ppl_lm.preferences.simulate_preferences(lm, [], u, 1000, T2, seed=0)
opt = exact_dpo_optimum(lp2, idx(pairs.chosen), idx(pairs.rejected), B2)
post = ppl_lm.infer(truth_model, method="svi", objective="dpo", preferences=pairs, batch_size=1000,
                    num_steps=150 if SMOKE else 300, num_samples=200, progress=False)
with torch.no_grad():
    lq = post.guide.lm.sequence([], max_new_tokens=T2).log_prob(xs2).double()
truth = torch.log_softmax(lp2 + u(xs2) / B2, 0)
print(f"KL(svi ‖ DPO*) = {kl(lq, opt):.2e}; KL(DPO* ‖ truth) = {kl(opt, truth):.3f}")
assert kl(lq, opt) < 0.01 * kl(opt, truth)  # optimisation error far below DPO's own statistical error
