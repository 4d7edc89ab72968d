# %% [markdown]
# # 7. RLHF is Bayes with a learned likelihood
#
# **Claim.** Fine-tuning on human preferences is conditioning on a likelihood learned from the
# preferences. A Bradley–Terry reward r_θ fitted to pairs gives the conditional
# $\pi'(x) \propto \pi(x)\,e^{r_\theta(x)/\beta}$; the reward is uncertain, and how that uncertainty
# enters ("mean", "marginal", "mixture") changes what the conditional does to texts the raters
# never saw. DPO skips the reward model and fits the guide to the pairs directly.
#
# Part 1 is an exact toy: every number is exact by enumeration, or checked against it. Part 2 does
# the same on SmolLM2: 300 pairs of its own continuations, judged by simulated raters whose two
# explanations agree on every pair they see, then MAP-reward RLHF (SVI, reverse KL), the
# "marginal" and "mixture" conditionals, and DPO, each read on the probe pairs of notebooks 5 and 6.

# %%
import contextlib
import io
import math
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")

import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch

import ppl_lm
from ppl_lm.diagnostics.warnings import PplLmWarning
from ppl_lm.inference.exact import enumerate_sequences
from ppl_lm.inference.svi.dpo import exact_dpo_optimum
from ppl_lm.models import preferences as mp
from ppl_lm.models import worlds

%matplotlib inline
SMOKE = ppl_lm.notebook.setup()  # one torch thread (PPL_LM_THREADS), smoke mode (PPL_LM_SMOKE=1)
warnings.simplefilter("ignore", PplLmWarning)

# %% [markdown]
# ## Part 1: the exact toy
#
# ### The ambiguous raters
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
# ### The reward's posterior keeps both explanations; MAP picks one
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
# ### What each conditional does to the probes (exact enumeration)

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
# ### DPO against its exact optimum
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

# %% [markdown]
# ## Part 2: SmolLM2
#
# ### Ambiguous raters on real text
#
# The context is the probe context of notebooks 5 and 6, "Here is what happened today:", so the
# probes are read in the context the conditionals are for. A text $x$ (12 new tokens) has two
# features, both standardised over prior draws:
#
# - *wording*: its VADER sentiment (what notebook 5's reward scored);
# - *events*: $\log \pi(x \mid \text{kinder preamble} + c) - \log \pi(x \mid c)$, how much better
#   notebook 6's "kinder world" preamble ("People are kinder than most stories suggest: ...")
#   predicts the text than the plain context does: what the LM itself expects of a kinder world.
#
# Two raters: "restricted text" likes pleasant words, $u_r = 1.5\,\phi_\text{wording}$; "kinder
# world" likes good events, $u_k = 1.5\,\phi_\text{events}$. As in the toy, raters are shown only
# pairs on which the two utilities agree: from all pairs of $M$ prior draws we keep the $n$ whose
# wording and events differences agree best (and whose wording differs by at least half a
# standard deviation, so that the pair says something). The kinder-world rater then chooses by
# Bradley–Terry; on the shown pairs the restricted-text rater would choose with nearly the same
# odds. The reward model is $r_\theta = \theta \cdot \phi$, $\theta \sim N(0, I)$.

# %%
if SMOKE:
    lm = ppl_lm.tiny_char_transformer(seed=0)
    context, T, M, n_pairs = worlds.toy_context, 6, 40, 60
    nuts = dict(num_samples=50, warmup_steps=50)
    svi = dict(num_steps=3, num_particles=2, num_samples=8)
    dpo_batch = 4
else:
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # hide the GGUF conversion progress bars
        lm = ppl_lm.load_lm()
    print(f"loaded SmolLM2 in {time.perf_counter() - t0:.0f} s")
    context, T, M, n_pairs = "Here is what happened today:", 12, 160, 300
    nuts = dict(num_samples=500, warmup_steps=300)
    svi = dict(num_steps=40, num_particles=8, num_samples=32)
    dpo_batch = 8
BETA2 = 0.5
kinder_prompt = worlds.prompts(lm, context)[1]
cache = {}


def raw_features(x):
    """[VADER, log π(x | kinder preamble + c) − log π(x | c)] for token ids [N, L], cached per text."""
    keys = [tuple(row.tolist()) for row in x]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if todo:
        xt = torch.tensor(todo)
        with torch.no_grad():  # the prior's network (a guide's adapter is off outside the guide)
            ev = (lm.score(kinder_prompt, xt) - lm.score(context, xt)).double()
        for k, v, e in zip(todo, ppl_lm.rewards.sentiment(lm, xt).double().tolist(), ev.tolist()):
            cache[k] = (v, e)
    return torch.tensor([cache[k] for k in keys], dtype=torch.float64)


t0 = time.perf_counter()
with ppl_lm.seeding.seeded(0), torch.no_grad():  # the draws rm.log_normalizers(..., num_samples=M, seed=0) makes
    xs_prior = lm.sequence(context, max_new_tokens=T).expand(torch.Size([M])).sample()
F_prior = raw_features(xs_prior)
mu, sd = F_prior.mean(0), F_prior.std(0).clamp_min(1e-6)


def phi(x):
    """Standardised features [wording, events] ``[N, 2]``."""
    return (raw_features(x) - mu) / sd


def u_kinder(x):
    return 1.5 * phi(x)[:, 1]


def u_restricted(x):
    return 1.5 * phi(x)[:, 0]


F = (F_prior - mu) / sd
i, j = torch.triu_indices(M, M, 1)
distinct = (xs_prior[i] != xs_prior[j]).any(-1)
dw, de = F[i, 0] - F[j, 0], F[i, 1] - F[j, 1]
badness = (dw - de).abs() + 1e3 * (dw.abs() < 0.5) + 1e6 * ~distinct
keep = torch.argsort(badness)[:n_pairs]
a, b = xs_prior[i[keep]], xs_prior[j[keep]]
g = torch.Generator().manual_seed(0)
first = torch.rand(n_pairs, generator=g, dtype=torch.float64) < torch.sigmoid(u_kinder(a) - u_kinder(b))
prefs2 = ppl_lm.Preferences(torch.where(first[:, None], a, b), torch.where(first[:, None], b, a))
gap = (u_kinder(a) - u_kinder(b)) - (u_restricted(a) - u_restricted(b))
print(f"{M} prior draws, features in {time.perf_counter() - t0:.0f} s; raw feature sd: wording {sd[0]:.3f} "
      f"(VADER), events {sd[1]:.2f} nats; correlation over the draws {float(torch.corrcoef(F.T)[0, 1]):+.2f}")
print(f"{n_pairs} shown pairs of {len(i)}: |u_k(a)−u_k(b)| mean {float((u_kinder(a) - u_kinder(b)).abs().mean()):.2f}; "
      f"the raters' utility gaps differ by at most {float(gap.abs().max()):.2f} (mean {float(gap.abs().mean()):.2f})")
print("a shown pair:", repr(lm.decode(prefs2.chosen[0])), ">", repr(lm.decode(prefs2.rejected[0])))

# %% [markdown]
# ### The reward's posterior, and a MAP point

# %%
t0 = time.perf_counter()
rm2 = ppl_lm.fit_reward(prefs2, phi, method="nuts", seed=0, **nuts)
rm2_map = ppl_lm.fit_reward(prefs2, phi, method="map", seed=0)
th = rm2.samples
kinder_share = float((th[:, 1] > th[:, 0]).double().mean())
d = rm2.diagnostics
print(f"NUTS ({len(th)} draws, 2 chains) and MAP in {time.perf_counter() - t0:.0f} s; R-hat {max(d['rhat']):.3f}, "
      f"bulk ESS {min(d['ess_bulk']):.0f}; training accuracy {d['train_accuracy']:.2f}")
print(f"posterior mean θ = {[round(v, 3) for v in th.mean(0).tolist()]}, sd {[round(v, 3) for v in th.std(0).tolist()]} "
      "(wording, events)")
print(f"θ_wording + θ_events: {float(th.sum(1).mean()):.2f} ± {float(th.sum(1).std()):.2f}; "
      f"θ_events − θ_wording: {float((th[:, 1] - th[:, 0]).mean()):+.2f} ± {float((th[:, 1] - th[:, 0]).std()):.2f}")
print(f"P(θ_events > θ_wording, the kinder side) = {kinder_share:.2f}; "
      f"MAP θ = {[round(v, 3) for v in rm2_map.samples[0].tolist()]}")
assert torch.isfinite(th).all() and torch.isfinite(rm2_map.samples).all()

# %% [markdown]
# ### What each conditional does to the probes: exact, given the reward's draws
#
# Every conditional here has the form $\pi'(x) = \pi(x)\,L(x)/Z$, so the shift of a probe pair,
# $\Delta(a) - \Delta(b)$ with $\Delta = \log \pi' - \log \pi$, is $\log L(a) - \log L(b)$: no
# normaliser, no sampling. $\log L$ is $r(x)/\beta$ for the two raters' utilities, the MAP
# reward and the posterior-mean reward; $\log \frac1S\sum_s e^{r_s(x)/\beta}$ for "marginal"; and
# $\log \frac1S \sum_s e^{r_s(x)/\beta}/Z(\theta_s)$ for "mixture", whose per-draw $\log Z(\theta_s)$
# comes from `rm.log_normalizers` (prior importance sampling on the $M$ draws above: consistent,
# biased low in log for a finite sample). $\beta = 0.5$.

# %%
wording_pairs = [
    (" The weather was lovely.", " The weather was awful."),
    (" The staff were friendly and helpful.", " The staff were rude and useless."),
    (" It was a great day.", " It was a terrible day."),
    (" The meal was delicious.", " The meal was disgusting."),
    (" We had a wonderful time.", " We had a horrible time."),
    (" The show was brilliant.", " The show was boring."),
    (" Everyone was happy.", " Everyone was sad."),
    (" The trip was fantastic.", " The trip was a disaster."),
]
world_pairs = [
    (" The bridge was opened to traffic.", " The bridge was closed to traffic."),
    (" All the passengers reached the station.", " None of the passengers reached the station."),
    (" The river level went down overnight.", " The river level went up overnight."),
    (" Prices at the market went down.", " Prices at the market went up."),
    (" The school stayed open all week.", " The school stayed shut all week."),
    (" The factory hired two hundred workers.", " The factory let go of two hundred workers."),
    (" The patient went home on Monday.", " The patient stayed in the ward on Monday."),
    (" The train arrived on time.", " The train arrived two hours late."),
]


def encode(texts):
    ids = [lm.encode(t) + [lm.eos_id] for t in texts]
    L = max(len(r) for r in ids)
    return torch.tensor([r + [lm.eos_id] * (L - len(r)) for r in ids])


probes = {kind: (encode([p for p, _ in pairs]), encode([q for _, q in pairs]))
          for kind, pairs in (("wording", wording_pairs), ("world", world_pairs))}
log_z2 = rm2.log_normalizers(lm, context, T, BETA2, num_samples=M, seed=0)
S = len(th)
log_lik = {
    "truth: kinder world": lambda x: u_kinder(x) / BETA2,
    "truth: restricted text": lambda x: u_restricted(x) / BETA2,
    "RLHF (MAP)": lambda x: rm2_map.reward(x) / BETA2,
    "mean": lambda x: rm2.reward(x) / BETA2,
    "marginal": lambda x: torch.logsumexp(rm2.reward(x, th) / BETA2, 0) - math.log(S),
    "mixture": lambda x: torch.logsumexp(rm2.reward(x, th) / BETA2 - log_z2[:, None], 0) - math.log(S),
}
exact_shift = {name: {kind: (f(xa) - f(xb)).numpy() for kind, (xa, xb) in probes.items()} for name, f in log_lik.items()}
print("probe features (standardised), mean over pairs of a − b:")
for kind, (xa, xb) in probes.items():
    print(f"  {kind:8} pairs: wording {float((phi(xa) - phi(xb))[:, 0].mean()):+.2f}, "
          f"events {float((phi(xa) - phi(xb))[:, 1].mean()):+.2f}")
print(f"\n{'conditional':24} {'wording pairs':>14} {'world pairs':>12}   (mean Δ(a) − Δ(b), nats, exact given θ's draws)")
for name, s in exact_shift.items():
    print(f"{name:24} {s['wording'].mean():+14.3f} {s['world'].mean():+12.3f}")
# Jensen: the marginal likelihood log E_θ e^{r_θ/β} is at least the mean reward over β, on every text.
for xa, xb in probes.values():
    for x in (xa, xb):
        assert (log_lik["marginal"](x) >= log_lik["mean"](x) - 1e-9).all()

# %% [markdown]
# ### Trained guides: MAP-reward RLHF, "marginal", "mixture" and DPO
#
# Each is a LoRA guide on SmolLM2 trained by `method="svi"`: the reverse KL (the ELBO, which is
# KL-regularised RL) on the model whose likelihood is the MAP reward (RLHF as practised), the
# "marginal" likelihood, and the "mixture" model (a latent draw index $s$ beside the sequence: a
# joint guide, a categorical $q(s)$ and the LoRA adapter, which does not read $s$); and
# `objective="dpo"` on the 300 pairs, with the MAP model's $\beta$. Each guide's probe shift,
# $\log q - \log \pi$ on the same texts, is measured against its target's exact shift above.

# %%
def learned_model(rm_, mode, log_z=None):
    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.learned_reward("rm", rm_, x, BETA2, uncertainty=mode, log_normalizers=log_z)
        return x

    return model


# "mixture" samples an index over the draws: 100 evenly spaced draws keep its categorical small.
rm2_thin = ppl_lm.RewardModel(th[:: max(1, S // 100)], phi, method="nuts")
log_z2_thin = log_z2[:: max(1, S // 100)]
jobs = {
    "RLHF (MAP)": (learned_model(rm2_map, "mean"), {}),
    "marginal": (learned_model(rm2, "marginal"), {}),
    "mixture": (learned_model(rm2_thin, "mixture", log_z2_thin), {}),
    "DPO": (learned_model(rm2_map, "mean"), dict(objective="dpo", preferences=prefs2, batch_size=dpo_batch)),
}
guides, seconds = {}, {}
for name, (m, extra) in jobs.items():
    t0 = time.perf_counter()
    post = ppl_lm.infer(m, context, method="svi", guide="lora", crosscheck_samples=0, seed=0, progress=False,
                        **svi, **extra)
    guides[name], seconds[name] = post.guide, time.perf_counter() - t0
    tr = post.info.trace
    last = ", ".join(f"{k} {np.mean(tr[k][-5:]):.3f}" for k in ("elbo", "kl_prior", "dpo_loss", "dpo_accuracy") if k in tr)
    print(f"{name:11} {seconds[name]:5.0f} s ({post.info.seconds_per_step:.1f} s/step); last 5 steps: {last}")


def guide_shift(guide, xa, xb):
    with torch.no_grad():
        da = guide.lm.score(context, xa).double() - lm.score(context, xa).double()
        db = guide.lm.score(context, xb).double() - lm.score(context, xb).double()
    return (da - db).numpy()


measured = {name: {kind: guide_shift(gd, xa, xb) for kind, (xa, xb) in probes.items()} for name, gd in guides.items()}
target = {"RLHF (MAP)": "RLHF (MAP)", "marginal": "marginal", "mixture": "mixture", "DPO": None}
print(f"\n{'guide':11} {'wording: measured':>18} {'target':>7} {'world: measured':>16} {'target':>7}")
for name, s in measured.items():
    t = exact_shift[target[name]] if target[name] else None
    cells = []
    for kind in ("wording", "world"):
        se = s[kind].std(ddof=1) / math.sqrt(len(s[kind]))
        cells.append(f"{s[kind].mean():+9.3f} ± {se:.3f}" + (f" {t[kind].mean():+7.3f}" if t else "       —"))
    print(f"{name:11} " + "  ".join(cells))
for s in measured.values():
    assert all(np.isfinite(v).all() for v in s.values())

# %%
fig, ax = plt.subplots(figsize=(10, 3.8))
kinds = ["wording", "world"]
names = list(exact_shift)
xs_bar = np.arange(len(kinds))
width = 0.8 / (len(names) + len(measured))
for k, name in enumerate(names):
    ax.bar(xs_bar - 0.4 + width * (k + 0.5), [exact_shift[name][kd].mean() for kd in kinds], width,
           label=f"{name} (exact)", color=f"C{k}", alpha=0.5)
for k, name in enumerate(measured):
    se = [measured[name][kd].std(ddof=1) / math.sqrt(len(measured[name][kd])) for kd in kinds]
    ax.bar(xs_bar - 0.4 + width * (len(names) + k + 0.5), [measured[name][kd].mean() for kd in kinds], width,
           yerr=[2 * v for v in se], capsize=3, label=f"{name} guide (±2 se)", color=f"C{k + 2}", hatch="//")
ax.axhline(0, color="grey", lw=0.5)
ax.set_xticks(xs_bar, [f"{kd} pairs" for kd in kinds])
ax.set_ylabel("mean Δ(a) − Δ(b) (nats)")
ax.set_title(f"{'tiny LM' if SMOKE else 'SmolLM2'}: probe shifts of each conditional and each trained guide")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()

# %% [markdown]
# ## Reading the committed run
#
# Run on the 2-core CPU, one torch thread, with 10 to 15 other processes on the machine (load 8 to
# 16): 3461 s of wall time for about 16 minutes of the kernel's CPU time. Sizes: the toy as in the
# tests (NUTS 2 × 500 draws; DPO 300 full-batch steps); on SmolLM2, M = 160 prior draws of 12
# tokens, 300 shown pairs, NUTS 2 × 500 draws after 300 warm-up steps, and four LoRA guides of 40
# steps (8 draws a step for the three reverse-KL guides, 8 pairs a step for DPO), β = 0.5.
#
# - *The toy is exact.* The pairs fix only 2θ_w + θ_e; NUTS keeps both explanations (28 % of the
#   draws on the kinder side; exact 30 %), MAP sits on the restricted side. On the probes' log-odds
#   (kinder world +1.5, restricted text −1.5) "mean" gives −0.95, "marginal" −0.96 and "mixture"
#   −0.52: only the mixture keeps part of the kinder explanation. SVI reaches DPO's exact
#   minimiser (KL 10⁻⁸), which is 0.10 nats from the true-utility posterior.
# - *On SmolLM2 the posterior keeps both explanations too.* On the 300 shown pairs the two raters'
#   utility gaps differ by at most 0.26 (mean 0.12, against a mean gap of 1.98), and the two
#   features are uncorrelated over the prior draws (−0.01), so the pairs pin down
#   θ_wording + θ_events = 1.64 ± 0.15 and leave the difference to the prior (−0.06 ± 1.26): 48 %
#   of the draws favour the kinder explanation (R-hat 1.006, bulk ESS 183). With standardised
#   features the MAP point is the middle of the ridge, (0.84, 0.79), the posterior mean: a
#   compromise, not either explanation.
# - *What each conditional does to the probes (exact given the draws).* Wording pairs are far
#   outside the shown texts (4.1 standard deviations of wording apart, against about 1.3 on the
#   average shown pair), so every shift there is an extrapolation: the restricted-text truth moves them by
#   +12.4 nats, the kinder-world truth by +3.1, MAP and "mean" by +8.6 and +8.7, "marginal" by
#   +4.5 and "mixture" by +5.5. The reward's uncertainty *shrinks* the shift: a text with extreme
#   features gets its likelihood from the draws that like it most, and so does its opposite.
#   World pairs (neutral words, good vs bad event) differ little in the events feature (+0.13 sd),
#   so the shifts are small: kinder truth +0.40, MAP +0.21, marginal +0.28, mixture +0.29,
#   restricted truth 0.
# - *The trained guides get a small part of the way.* After 40 steps, MAP-reward RLHF moved wording
#   pairs by +1.00 ± 0.20 nats (12 % of its target +8.6), "marginal" by +0.57 ± 0.28 (13 % of
#   +4.5), "mixture" by +1.37 ± 0.37 (25 % of +5.5); on world pairs all three are within two
#   standard errors of zero (targets +0.2 to +0.3). DPO, trained on the pairs alone (final batch
#   loss 0.28, 83 % of its pairs ordered right), moved wording pairs the most, +2.67 ± 0.69, and
#   world pairs by −0.13 ± 0.26: it has no exact target on texts no pair holds (its minimiser is
#   not unique there), and what it does there comes from the network, not from the data.
# - *Against notebooks 5 and 6.* Notebook 5's guide on the VADER reward (β = 0.25) moved wording
#   pairs by +0.80 and world pairs by −0.02; notebook 6's world model moved both by at most a few
#   tenths. Here every learned-reward guide moves wording pairs by +0.6 to +2.7 nats and world
#   pairs by nothing measurable: the fitted reward, however its uncertainty enters, generalises
#   as "restricted text" on these probes, although half of its posterior says "kinder world",
#   because the LM's own notion of a kinder world barely separates the world pairs.
# - *What the numbers cannot say.* One context, 40 steps (the guides are far from their targets:
#   13–25 % of the exact shifts), 8 pairs of each kind, and a selection of shown pairs made to be
#   ambiguous. The exact shifts of "mixture" rest on log Z(θ) estimated from 160 prior draws
#   (biased low in log). The SVI runs took 783–909 s each here (19–22 s a step of wall time, about
#   4 s of CPU by the kernel's total): on an idle machine the notebook would take about its CPU
#   time, 16 minutes.
