# %% [markdown]
# # 6. A world behind the text
#
# **Claim.** A positive-sentiment condition can be explained in more than one way, and the
# Bayesian answer to "how should the conditional generalise?" is a posterior over those
# explanations. We write the explanations as a latent *world* $w$ that the LM reads as a preamble:
#
# - `plain`: no preamble, the LM as it is;
# - `kinder`: "People are kinder than most stories suggest: ...": good things *happen* more;
# - `restricted`: "Only pleasant things get written down here; ...": what gets *recorded* is filtered.
#
# The model (`ppl_lm.models.worlds`) is $p(w)\,\pi(x \mid \text{preamble}_w + c)\,e^{r(x)/\beta}$ with
# $r$ the VADER sentiment and $\beta = 0.25$. The posterior $p(w \mid \text{positive})$ says which world
# explains the reward; its predictive on *new* contexts, $\sum_w p(w \mid \text{positive})\,\pi(x \mid
# \text{preamble}_w + c')$, is how this Bayesian model generalises. We compute $p(w \mid \text{positive})$
# exactly on a toy, then by importance sampling, SMC, MH and SVI on SmolLM2 (the three preambles have
# different token lengths: the backends read ragged prompts), and compare the predictive shift on the
# probe pairs of notebook 5 with what the fine-tuned guide of notebook 5 did.

# %%
import contextlib
import io
import math
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", category=UserWarning, module="ppl_lm")

import matplotlib.pyplot as plt
import numpy as np
import torch

import ppl_lm
from ppl_lm import rewards
from ppl_lm.inference.svi.joint import LATENT_SCALE
from ppl_lm.models import worlds

%matplotlib inline
SMOKE = ppl_lm.notebook.setup()  # one torch thread (PPL_LM_THREADS), smoke mode (PPL_LM_SMOKE=1)
BETA = 0.25

# %% [markdown]
# ## The toy: an exact answer
#
# A Markov LM over six word tokens. The world is the last prompt token (a Markov LM reads only
# that): `plain` reads no prompt, `kinder` reads " kind", after which " good" is likely, and
# `restricted` reads " rule", after which " bad" is nearly never written but everything else keeps
# the plain odds. Sequences have at most 3 tokens, so the exact backend enumerates every $(w, x)$.

# %%
toy_words = ["", " good", " bad", " day", " kind", " rule"]
init = torch.tensor([-1.0, 0.0, 0.0, 0.5, -9.0, -9.0])  # after no prompt: the plain world
trans = torch.tensor([
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # (after EOS: unused)
    [0.5, -1.0, -1.0, 0.5, -9.0, -9.0],  # after " good"
    [0.5, -1.0, -1.0, 0.5, -9.0, -9.0],  # after " bad"
    [1.0, 0.0, 0.0, -1.0, -9.0, -9.0],   # after " day"
    [-1.0, 1.5, -0.5, 0.5, -9.0, -9.0],  # after " kind": good things happen
    [-1.0, 0.0, -6.0, 0.5, -9.0, -9.0],  # after " rule": bad things are not written
])
toy = ppl_lm.MarkovLM(init, trans, eos_id=0, token_strings=toy_words)
toy_model = worlds.build(toy, beta=BETA, max_new_tokens=3, preambles=["", " kind", " rule"])
print("sentiment of ' good day', ' bad day', ' day':",
      [round(rewards.sentiment(toy, torch.tensor([toy.encode(t) + [0]]))[0].item(), 3) for t in (" good day", " bad day", " day")])

exact = ppl_lm.infer(toy_model, "", method="exact")
p_exact = {worlds.WORLDS[int(k)]: p for k, (p, _) in exact.marginal("w").items()}
print("prior      :", dict(zip(worlds.WORLDS, worlds.PRIOR)))
print("exact p(w | positive):", {k: round(v, 4) for k, v in p_exact.items()})
print("p(w | positive) / p(w):", {k: round(p_exact[k] / q, 3) for k, q in zip(worlds.WORLDS, worlds.PRIOR)})

# %% [markdown]
# The backends on the toy, against that exact answer. The tolerance comes from the problem, not
# from the estimators: prior importance sampling with $N$ draws has the effective sample size
# $N f$ with $f = (\mathbb{E}_p w)^2 / \mathbb{E}_p w^2$ computed exactly by enumeration, so a probability $p$
# is off by about $\sqrt{p(1-p)/(N f)}$; we allow four of those.

# %%
lp, ll = exact.stats["log_prior"].double(), exact.stats["log_likelihood"].double()
f_exact = float(torch.exp(2 * torch.logsumexp(lp + ll, 0) - torch.logsumexp(lp + 2 * ll, 0)))
N_toy = 2_000 if SMOKE else 8_000
toy_runs = {
    "importance": ppl_lm.infer(toy_model, "", method="importance", num_samples=N_toy, seed=0, progress=False),
    "smc": ppl_lm.infer(toy_model, "", method="smc", num_particles=N_toy, seed=0, progress=False),
}
print(f"exact prior-IS ESS fraction f = {f_exact:.3f}")
print(f"{'world':11} {'exact':>7} " + " ".join(f"{m:>18}" for m in toy_runs))
for k, name in enumerate(worlds.WORLDS):
    cells = []
    for m, post in toy_runs.items():
        p, se = post.marginal("w").get(k, (0.0, 0.0))
        tol = 4 * math.sqrt(p_exact[name] * (1 - p_exact[name]) / (N_toy * f_exact))
        assert abs(p - p_exact[name]) <= tol, (m, name, p, p_exact[name], tol)
        cells.append(f"{p:.4f} ± {se:.4f}")
    print(f"{name:11} {p_exact[name]:7.4f} " + " ".join(f"{c:>18}" for c in cells))

# %% [markdown]
# On the toy the ratio $p(w \mid \text{positive}) / p(w)$ (how much better world $w$ explains the reward
# than the average world) is largest for `kinder`: after " kind" the good event is likely, so the
# reward is likely. The `restricted` world removes the bad event, which the reward punishes, but
# does not add good ones, so it explains less. The backends agree with the exact answer within
# the error the problem sets.
#
# ## SmolLM2: p(w | positive) by IS, SMC, MH and SVI
#
# SVI trains one joint guide on the whole program: a LoRA adapter for the sequence (the guide reads
# the same preamble as the model) and a categorical $q(w)$, on one ELBO; its result is the guide's draws
# importance-weighted against the exact target, so its $p(w \mid \text{positive})$ is comparable with the others'.

# %%
if SMOKE:
    lm = ppl_lm.tiny_char_transformer(seed=0)
    context, T = worlds.toy_context, 6
    sizes = dict(is_n=32, smc_n=16, mh=dict(num_samples=4, num_chains=2, warmup_steps=2),
                 svi=dict(num_steps=3, num_particles=2, num_samples=16))
else:
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # hide the GGUF conversion progress bars
        lm = ppl_lm.load_lm()
    print(f"loaded SmolLM2 in {time.perf_counter() - t0:.0f} s")
    context, T = worlds.context, 12
    sizes = dict(is_n=1024, smc_n=512, mh=dict(num_samples=30, num_chains=4, warmup_steps=10),
                 svi=dict(num_steps=80, num_particles=8, num_samples=512))
model = worlds.build(lm, beta=BETA, max_new_tokens=T)
print("context:", repr(context))
print("prompt lengths (tokens) per world:", dict(zip(worlds.WORLDS, map(len, worlds.prompts(lm, context)))))

runs, seconds = {}, {}
for method, opts in (("importance", dict(num_samples=sizes["is_n"])), ("smc", dict(num_particles=sizes["smc_n"])),
                     ("mh", sizes["mh"]), ("svi", sizes["svi"])):
    t0 = time.perf_counter()
    runs[method] = ppl_lm.infer(model, context, method=method, seed=1, progress=False, **opts)
    seconds[method] = time.perf_counter() - t0
    print(f"{method:10} {seconds[method]:6.0f} s  ESS {runs[method].ess:7.1f}  options {opts}")

# %%
print(f"{'world':11} {'prior':>6} " + " ".join(f"{m:>16}" for m in runs))
table = {}
for k, name in enumerate(worlds.WORLDS):
    table[name] = {m: post.marginal("w").get(k, (0.0, 0.0)) for m, post in runs.items()}
    print(f"{name:11} {worlds.PRIOR[k]:6.2f} " + " ".join(f"{p:.3f} ± {se:.3f}".rjust(16) for p, se in table[name].values()))
# Agreement: for each pair of backends and each world, the gap in standard errors of the difference.
z = {}
for a in runs:
    for b in runs:
        if a < b:
            z[(a, b)] = max(abs(table[n][a][0] - table[n][b][0]) / max(math.hypot(table[n][a][1], table[n][b][1]), 1e-12)
                            for n in worlds.WORLDS)
for (a, b), v in z.items():
    print(f"{a} vs {b}: largest gap {v:.1f} standard errors ({'agree' if v < 3 else 'DISAGREE'} at 3 se)")
for name in worlds.WORLDS:
    assert all(0 <= p <= 1 for p, _ in table[name].values())
assert all(abs(sum(p for p, _ in post.marginal("w").values()) - 1) < 1e-6 for post in runs.values())
# SVI's joint guide learned q(w) (a categorical, trained with the LoRA adapter on the sequence);
# its importance-corrected p(w | positive) is in the table above.
q_w = torch.softmax(getattr(runs["svi"].guide.module, "site0_logits").detach().double()
                    * LATENT_SCALE[runs["svi"].guide.kind], -1)
print("SVI guide's own q(w):", {n: round(float(q), 3) for n, q in zip(worlds.WORLDS, q_w)})
print("\nexamples (IS, heaviest weights):")
w_is = runs["importance"].values["w"]
for i in torch.argsort(runs["importance"].log_weights, descending=True)[:3].tolist():
    print(f"  [{worlds.WORLDS[int(w_is[i])]}] {runs['importance'].texts[i]!r}")

# %%
fig, ax = plt.subplots(figsize=(8, 3.4))
xs = np.arange(len(worlds.WORLDS))
ax.bar(xs - 0.3, worlds.PRIOR, 0.15, color="lightgrey", label="prior p(w)")
for i, m in enumerate(runs):
    ax.errorbar(xs - 0.1 + 0.15 * i, [table[n][m][0] for n in worlds.WORLDS],
                yerr=[2 * table[n][m][1] for n in worlds.WORLDS], fmt="os^v"[i], capsize=4, label=f"{m} (±2 se)")
ax.set_xticks(xs, worlds.WORLDS)
ax.set_ylabel("p(w | positive)")
ax.set_title("which world explains a positive continuation")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## How the Bayesian model generalises: the probe pairs of notebook 5
#
# Notebook 5 probed its fine-tuned guide with pairs of complete continuations of a new, neutral
# context ("Here is what happened today:"): *wording* pairs (same event, positive vs negative words)
# and *world* pairs (good vs bad event, neutral words, equal VADER score). Here the same probes go
# through the world model's posterior predictive. No reward applies at the probe: the reward was
# evidence about $w$, and only what it taught about $w$ carries over,
# $$\Delta(a) = \log \sum_w p(w \mid \text{positive})\,\pi(a \mid \text{pre}_w + c') - \log \sum_w p(w)\,\pi(a \mid \text{pre}_w + c').$$
# For a pair, $\Delta(a) - \Delta(b)$ is the predictive shift of the good text over the bad one.

# %%
probe_context = "Here is what happened today:"
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


def world_scores(texts):
    """log π(text | preamble_w + probe context) for every world: [len(texts), 3]."""
    ids = [lm.encode(t) + [lm.eos_id] for t in texts]
    L = max(len(i) for i in ids)
    x = torch.tensor([i + [lm.eos_id] * (L - len(i)) for i in ids])
    with torch.no_grad():
        return torch.stack([lm.score(p, x).double() for p in worlds.prompts(lm, probe_context)], -1)


log_prior_w = torch.tensor(worlds.PRIOR, dtype=torch.float64).log()


def shifts(pairs, p_w):
    log_post_w = torch.tensor([max(p_w[n], 1e-300) for n in worlds.WORLDS], dtype=torch.float64).log()
    out = []
    for side in (0, 1):
        L = world_scores([pair[side] for pair in pairs])
        out.append(torch.logsumexp(log_post_w + L, -1) - torch.logsumexp(log_prior_w + L, -1))
    return (out[0] - out[1]).numpy()


bayes = {}
for m in runs:
    p_w = {n: table[n][m][0] for n in worlds.WORLDS}
    bayes[m] = {"wording": shifts(wording_pairs, p_w), "world": shifts(world_pairs, p_w)}
# How far the worlds themselves pull the pairs apart: the largest possible shift puts all mass on one world.
extreme = {n: {"wording": shifts(wording_pairs, {k: float(k == n) for k in worlds.WORLDS}).mean(),
               "world": shifts(world_pairs, {k: float(k == n) for k in worlds.WORLDS}).mean()} for n in worlds.WORLDS}
# Notebook 5's fine-tuned LoRA guide (60 SVI steps, SmolLM2, beta = 0.25), from its committed run:
# mean Δ(a)−Δ(b) with 95% bootstrap intervals. Not recomputed here (training takes many CPU minutes).
finetuned = {"wording": (1.25, 0.95, 1.54), "world": (0.11, -0.28, 0.48)}
print(f"{'pairs':8} " + " ".join(f"{'Bayes/' + m:>15}" for m in bayes) + f" {'fine-tuned (nb 5)':>24} {'exact tilt (r gap/β)':>21}")
gap = {}
for kind, pairs in (("wording", wording_pairs), ("world", world_pairs)):
    xa = [lm.encode(a) + [lm.eos_id] for a, _ in pairs]
    xb = [lm.encode(b) + [lm.eos_id] for _, b in pairs]
    ra = np.array([rewards.sentiment(lm, torch.tensor([i]))[0].item() for i in xa])
    rb = np.array([rewards.sentiment(lm, torch.tensor([i]))[0].item() for i in xb])
    gap[kind] = float((ra - rb).mean()) / BETA
    ft = finetuned[kind]
    print(f"{kind:8} " + " ".join(f"{bayes[m][kind].mean():+15.3f}" for m in bayes)
          + f" {ft[0]:+9.2f} [{ft[1]:+.2f}, {ft[2]:+.2f}]" + f" {gap[kind]:+21.2f}")
print("\nall mass on one world (the largest shift this model can make):")
for n, e in extreme.items():
    print(f"  {n:11} wording {e['wording']:+.3f}  world {e['world']:+.3f}")
for m in bayes:
    assert all(np.isfinite(v).all() for v in bayes[m].values())

# %%
fig, ax = plt.subplots(figsize=(8, 3.4))
kinds = ["wording", "world"]
xs = np.arange(2)
for i, m in enumerate(bayes):
    ax.bar(xs - 0.3 + 0.15 * i, [bayes[m][k].mean() for k in kinds], 0.15, label=f"Bayes, p(w) from {m}")
ax.errorbar(xs + 0.2, [finetuned[k][0] for k in kinds],
            yerr=np.array([[finetuned[k][0] - finetuned[k][1], finetuned[k][2] - finetuned[k][0]] for k in kinds]).T,
            fmt="D", color="k", capsize=5, label="fine-tuned guide (notebook 5, 95% CI)")
ax.axhline(0, color="grey", lw=0.5)
ax.set_xticks(xs, [f"{k} pairs" for k in kinds])
ax.set_ylabel("mean Δ(a) − Δ(b) (nats)")
ax.set_title("predictive shift of good over bad texts in a new context")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## The other route: which world wrote these texts?
#
# The reward route asks which world explains *a positive continuation*: the evidence is a score,
# $e^{r(x)/\beta}$, on text the model writes itself. The other route conditions on *data*: eight
# sentences that were actually written after the same context (`ppl_lm.models.which_world`: four
# positive, four neutral, SmolLM2 samples), and the LM is the likelihood,
# $p(w \mid \text{texts}) \propto p(w) \prod_i \pi(\text{text}_i \mid \text{pre}_w + c)$. Only $w$ is
# latent, so exact enumeration (3 worlds × 8 texts, one LM pass each) is the truth even on SmolLM2;
# importance sampling, SMC and MH run the same model with modest budgets.

# %%
from ppl_lm.models import which_world

ww_context = which_world.toy_context if SMOKE else which_world.context
ww_texts = list(which_world.TEXTS)
assert all(lm.decode(lm.encode(t)) == t for t in ww_texts), "the LM cannot spell the observed texts"
ww_model = which_world.build(lm, texts=ww_texts)
ww_opts = {"exact": {}, "importance": dict(num_samples=256), "smc": dict(num_particles=256),
           "mh": dict(num_samples=100, num_chains=2 if SMOKE else 4, warmup_steps=5 if SMOKE else 10)}
ww_runs, ww_seconds = {}, {}
for method, opts in ww_opts.items():
    t0 = time.perf_counter()
    ww_runs[method] = ppl_lm.infer(ww_model, ww_context, method=method, seed=1, progress=False, **opts)
    ww_seconds[method] = time.perf_counter() - t0
p_texts = {n: ww_runs["exact"].marginal("w").get(k, (0.0, 0.0))[0] for k, n in enumerate(worlds.WORLDS)}
print(f"{'world':11} {'prior':>6} {'exact':>7} " + " ".join(f"{m:>16}" for m in ww_runs if m != "exact"))
ww_z = {}
for k, n in enumerate(worlds.WORLDS):
    cells = []
    for m, post in ww_runs.items():
        if m != "exact":
            p, se = post.marginal("w").get(k, (0.0, 0.0))
            ww_z[(m, n)] = abs(p - p_texts[n]) / max(se, 1e-12)
            cells.append(f"{p:.3f} ± {se:.3f}".rjust(16))
    print(f"{n:11} {worlds.PRIOR[k]:6.2f} {p_texts[n]:7.4f} " + " ".join(cells))
for m in ww_runs:
    largest = max((v for (a, _), v in ww_z.items() if a == m), default=0.0)
    print(f"{m:10} {ww_seconds[m]:6.1f} s" + ("" if m == "exact" else f"  ESS {ww_runs[m].ess:6.1f}"
                                             f"  largest gap to exact {largest:.1f} se"))
assert abs(sum(p_texts.values()) - 1) < 1e-6
for m, post in ww_runs.items():  # within 4 se of the truth, the se taken at the exact p (a small p̂ understates it)
    for k, n in enumerate(worlds.WORLDS):
        p, se = post.marginal("w").get(k, (0.0, 0.0))
        tol = 4 * max(se, math.sqrt(p_texts[n] * (1 - p_texts[n]) / max(post.ess, 1.0)))
        assert abs(p - p_texts[n]) <= tol, (m, n, p, p_texts[n], se, tol)

# %%
cols = {"prior p(w)": dict(zip(worlds.WORLDS, worlds.PRIOR)),
        "p(w | positive), IS": {n: table[n]["importance"][0] for n in worlds.WORLDS},
        "p(w | positive), SMC": {n: table[n]["smc"][0] for n in worlds.WORLDS},
        "p(w | texts), exact": p_texts}
errs = {"p(w | positive), IS": {n: table[n]["importance"][1] for n in worlds.WORLDS},
        "p(w | positive), SMC": {n: table[n]["smc"][1] for n in worlds.WORLDS}}
print(f"{'world':11} " + " ".join(f"{c:>21}" for c in cols))
for n in worlds.WORLDS:
    print(f"{n:11} " + " ".join(f"{cols[c][n]:21.3f}" for c in cols))
# What each posterior predicts on notebook 5's probe pairs (mean Δ(a) − Δ(b), nats), as in the section above.
ww_shift = {kind: shifts(pairs, p_texts).mean() for kind, pairs in (("wording", wording_pairs), ("world", world_pairs))}
print(f"predictive shift, p(w | texts): wording {ww_shift['wording']:+.3f}, world {ww_shift['world']:+.3f};"
      f" p(w | positive) by IS: wording {bayes['importance']['wording'].mean():+.3f},"
      f" world {bayes['importance']['world'].mean():+.3f}")
fig, ax = plt.subplots(figsize=(8, 3.4))
xs = np.arange(len(worlds.WORLDS))
for i, (c, vals) in enumerate(cols.items()):
    e = [2 * errs[c][n] for n in worlds.WORLDS] if c in errs else None
    ax.bar(xs - 0.3 + 0.2 * i, [vals[n] for n in worlds.WORLDS], 0.2, yerr=e, capsize=3,
           color=["lightgrey", "tab:orange", "tab:red", "tab:blue"][i], label=c + (" (±2 se)" if c in errs else ""))
ax.set_xticks(xs, worlds.WORLDS)
ax.set_ylabel("probability of the world")
ax.set_title("which world? conditioning on a reward vs on observed text")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# The two routes condition on different evidence. The reward route conditions on one property
# of text the model writes itself, a positive score, which every preamble makes about equally
# likely here, so $p(w \mid \text{positive})$ stays within about 0.15 of the prior (and IS and SMC
# do not agree on how). The observed route conditions on every token of eight given sentences:
# any feature of them that one preamble predicts better (wording, length, topic, not only
# sentiment) moves it, here from `kinder` to `restricted` (exact 0.449 / 0.112 / 0.439). So the
# reward route generalises only along what the reward measures, the observed route along
# whatever the texts are like: on notebook 5's probes $p(w \mid \text{texts})$ predicts −0.38
# nats on wording pairs and −0.09 on world pairs, while $p(w \mid \text{positive})$ by IS
# predicts +0.11 and −0.01.

# %% [markdown]
# ## Reading the committed run (SmolLM2)
#
# Run on the 2-core CPU, one torch thread, with other jobs on the machine (load 3 to 8): 4087 s.
#
# - *The toy is exact, and the backends match it.* Exact enumeration gives p(w | positive) = 0.390 /
#   0.356 / 0.254 for plain / kinder / restricted (prior 0.5 / 0.25 / 0.25): the kinder world explains
#   the reward 1.42 times better than the average world, the restricted one 1.02 times, the plain
#   one 0.78 times. Importance sampling (0.372, 0.359, 0.269) and SMC (0.387, 0.356, 0.257) with
#   8000 draws are within the four-standard-error band that the exact prior-IS ESS (f = 0.37) sets.
# - *On SmolLM2 the reward moves the world little, and IS and SMC disagree on how.*
#   - Importance sampling (1024 draws, ESS 392, 175 s): 0.452 ± 0.025 / 0.295 ± 0.024 / 0.252 ± 0.022.
#   - SMC (512 particles, ESS 286, 286 s): 0.518 ± 0.063 / 0.117 ± 0.037 / 0.366 ± 0.062.
#   - SVI (80 steps × 8 draws, then 512 guide draws weighted, ESS 188, 1519 s): 0.406 ± 0.035 /
#     0.283 ± 0.031 / 0.311 ± 0.037. The guide's own q(w) learned 0.404 / 0.274 / 0.322.
#   - MH (4 chains, 30 draws after 10 warm-up steps, 622 s): 0.333 ± 0.129 / 0.183 ± 0.096 /
#     0.483 ± 0.143. It has not mixed (R-hat 1.39, bulk ESS 12), and its own warnings say so.
#
#   The largest gaps are IS vs SMC, 4.0 standard errors (on kinder), and SMC vs SVI, 3.4; the
#   others are within 1.6. The previous run had SMC at 0.510 / 0.246 / 0.244 (IS vs SMC 1.5 se):
#   with the same seed, SMC's answer on kinder moved by more than its own error bar, so its
#   standard error understates the run-to-run spread here. IS and SVI leave p(w) within about 0.1
#   of the prior (MH, unmixed, puts 0.48 on restricted), and none of IS, SVI and MH tells kinder
#   from restricted by more than two standard errors; in this context a positive continuation is
#   about equally likely under all three preambles.
# - *The observed route (eight texts, the LM as likelihood).* Exact enumeration (8 s) gives
#   p(w | texts) = 0.449 / 0.112 / 0.439. Importance sampling (256 draws, ESS 213, 8 s): 0.466 ±
#   0.034 / 0.088 ± 0.013 / 0.446 ± 0.035; SMC (256 particles, ESS 213, 18 s; with no latent
#   sequence it is importance sampling from the prior): 0.461 ± 0.033 / 0.088 ± 0.013 / 0.451 ±
#   0.035; both within 1.9 standard errors of exact. MH (4 chains × 100 draws after 10 warm-up
#   steps, exact Gibbs steps on w, ESS 380, 1345 s): 0.447 ± 0.026 / 0.145 ± 0.016 / 0.407 ±
#   0.024, within 2.1. The same MH run as a standalone script on this machine took 61 s. It took
#   22 times longer here because the SVI cell above had injected its LoRA adapter into SmolLM2's
#   network, which made the prior look trainable, so the run's cache of observed rows stood aside
#   and every one of MH's model runs re-scored the eight texts. Found after this run and fixed
#   (the prior ignores adapters that are off in its calls; `tests/test_observed.py`); the
#   committed output is the slow run's.
#   SMC's answer moving between runs with the same seed has a plainer part too: this version draws
#   the model's placeholder sites once more before sampling, so the random stream differs.
# - *How this Bayesian model generalises.* Putting all mass on one world bounds what the model can
#   do on notebook 5's probes:
#   - the kinder preamble shifts wording pairs by +1.93 nats and world pairs by +0.55 (good events
#     become likelier even in neutral words: the "kinder world" reading);
#   - the restricted preamble shifts them by −1.01 and −0.46 (SmolLM2 does not read "only pleasant
#     things get written down" as "write pleasantly");
#   - plain shifts them by −1.41 and +0.12.
#
#   With the posteriors above, the predictive shifts are small:
#   - wording pairs: +0.11 (IS), −0.37 (SMC), +0.09 (SVI), −0.13 (MH, unmixed);
#   - world pairs: −0.005, −0.05, −0.04 and −0.13.
#
#   The fine-tuned guide of notebook 5 moved wording pairs by +0.80 [0.52, 1.14], more than twice
#   any of these, and world pairs by −0.02 [−0.25, +0.25]. On the same reward the two
#   generalise differently, in numbers. Fine-tuning learned the reward's wording: "restricted
#   text" in notebook 5's sense. The Bayesian world model can only move probability along the
#   directions its three preambles span, and the evidence barely moves it.
# - *What the numbers cannot say.* One context, 12 new tokens, a hand-written set of three
#   preambles and a few hundred draws: the posterior over worlds is weakly identified here, and
#   the comparison with the fine-tune says more about how differently the two generalise (through
#   the preambles' meaning vs through the reward's words) than about which is right.
