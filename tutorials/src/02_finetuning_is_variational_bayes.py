# %% [markdown]
# # 2. Fine-tuning is variational Bayes
#
# **Claim.** KL-regularised reward fine-tuning (RLHF without the critic) is stochastic variational
# inference on the model "prior $\pi$ = the LM, likelihood $e^{r(x)/\beta}$". With the fine-tuned
# LM $q$ as the variational family,
#
# $$\mathrm{ELBO}(q) = \mathbb{E}_q[\log \pi(x) + r(x)/\beta - \log q(x)]
#   = \frac{\mathbb{E}_q[r] - \beta\,\mathrm{KL}(q\,\|\,\pi)}{\beta},
# \qquad \log Z - \mathrm{ELBO}(q) = \mathrm{KL}(q\,\|\,\pi'),$$
#
# where $\pi'(x) \propto \pi(x)\,e^{r(x)/\beta}$ is the posterior. So maximising the RL objective is
# maximising the ELBO, and the optimum is the posterior itself.
#
# We check:
# 1. both identities numerically on a toy LM, by enumerating every sequence;
# 2. that SVI (Pyro's `SVI` with the score-function `RLOO_ELBO`) drives $\mathrm{KL}(q\|\pi')$ to
#    about zero on the toy, with a guide family that contains the posterior;
# 3. that the two directions of the KL fit different guides when the family cannot hold the
#    posterior: reverse KL (the ELBO) seeks a mode, forward KL (distribution matching,
#    `objective="forward"`) covers both, by exact enumeration on a two-mode toy;
# 4. LoRA fine-tuning of SmolLM2 toward positive sentiment (VADER) on CPU with both objectives,
#    and $\log \hat Z - \widehat{\mathrm{ELBO}} = \widehat{\mathrm{KL}}(q\|\pi')$ from samples.

# %%
import contextlib
import io
import math
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message=".*k-hat.*")

import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

import ppl_lm
from ppl_lm import rewards
from ppl_lm.inference.svi.elbo import RLOO_ELBO, particle_terms
from ppl_lm.inference.svi.guides import make_guide
from ppl_lm.inference.exact import enumerate_sequences

%matplotlib inline
SMOKE = ppl_lm.notebook.setup()  # one torch thread (PPL_LM_THREADS), smoke mode (PPL_LM_SMOKE=1)

# %% [markdown]
# ## 1. The identities, by enumeration
#
# A Markov LM over `a b c d` (+ EOS), at most $T=4$ tokens: 341 sequences. The reward counts the
# letter `b` and charges for length; $\beta = 0.5$.

# %%
toy = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)
T_toy, beta = 4, 0.5


def toy_model():
    x = pyro.sample("x", toy.sequence([], max_new_tokens=T_toy))
    r = (x == 2).float().sum(-1) - 0.3 * rewards.length(toy, x)
    ppl_lm.reward("r", r, beta=beta)
    return x


exact = ppl_lm.infer(toy_model, method="exact")
log_Z = exact.log_evidence
seqs = enumerate_sequences(toy.vocab_size, toy.eos_id, T_toy)


def exact_terms(guide):
    """Every quantity of the ELBO, exactly: the guide evaluated on every sequence."""
    with torch.no_grad():
        t = particle_terms(toy_model, guide, (), {}, len(seqs), values={"x": seqs})
    q = t.log_q.double().exp()
    log_joint = (t.log_prior + t.log_likelihood).double()
    f = log_joint - t.log_q.double()
    r = t.rewards["r"].double()
    log_post = log_joint - log_Z
    return {
        "sum_q": float(q.sum()),
        "elbo": float((q * f).sum()),
        "reward": float((q * r).sum()),
        "kl_prior": float((q * (t.log_q.double() - t.log_prior.double())).sum()),
        "kl_post": float((q * (t.log_q.double() - log_post)).sum()),
    }


# Any q will do for the identities: here the guide family (a position-dependent Markov LM)
# started at the prior and perturbed at random.
guide = make_guide(toy_model, kind="full")
with torch.no_grad():
    g = torch.Generator().manual_seed(0)
    for p in guide.module.parameters():
        p.add_(torch.randn(p.shape, generator=g))
e = exact_terms(guide)
print(f"Σ_x q(x) = {e['sum_q']:.6f}")
print(f"ELBO                         = {e['elbo']:.6f}")
print(f"(E_q[r] − β·KL(q‖π)) / β     = {(e['reward'] - beta * e['kl_prior']) / beta:.6f}"
      f"   (E_q[r] = {e['reward']:.4f}, KL(q‖π) = {e['kl_prior']:.4f})")
print(f"log Z − ELBO                 = {log_Z - e['elbo']:.6f}")
print(f"KL(q‖π')                     = {e['kl_post']:.6f}")

# %%
assert abs(e["sum_q"] - 1) < 1e-5
assert abs(e["elbo"] - (e["reward"] - beta * e["kl_prior"]) / beta) < 1e-4
assert abs((log_Z - e["elbo"]) - e["kl_post"]) < 1e-4 and e["kl_post"] > 0

# %% [markdown]
# ## 2. SVI converges to the posterior (toy)
#
# The guide is the same family (started at the prior). Each step draws 16 sequences from $q$ and
# follows the score-function gradient with a leave-one-out baseline; every few steps we compute
# the exact $\mathrm{KL}(q\|\pi')$ by enumeration. This is plain Pyro: `SVI(model, guide, Adam,
# loss=RLOO_ELBO(16))`.

# %%
steps = 100 if SMOKE else 300
pyro.clear_param_store()
guide = make_guide(toy_model, kind="full")
svi = SVI(toy_model, guide, Adam({"lr": 0.1}), loss=RLOO_ELBO(num_particles=16))
curve, est = [], []
with ppl_lm.seeding.seeded(0):
    for step in range(steps + 1):
        if step % 10 == 0:
            curve.append((step, exact_terms(guide)["kl_post"]))
        if step < steps:
            loss = svi.step()
            est.append(log_Z + loss)  # log Z − ELBO estimate from this step's 16 particles
kl_start, kl_end = curve[0][1], curve[-1][1]
print(f"exact KL(q‖π'): {kl_start:.4f} at the prior → {kl_end:.4f} after {steps} steps")

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.5))
w = 20
smooth = np.convolve(est, np.ones(w) / w, mode="valid")
ax.plot(np.arange(len(smooth)) + w - 1, smooth, color="C1", alpha=0.7,
        label=f"log Z − ELBO estimate (16 particles, mean of {w} steps)")
s, k = zip(*curve)
ax.plot(s, k, "o-", color="C0", label="exact KL(q‖π') by enumeration")
ax.axhline(0, color="k", lw=0.5)
ax.set_yscale("symlog", linthresh=1e-3)
ax.set_xlabel("SVI step")
ax.set_ylabel("nats")
ax.legend()
ax.set_title("SVI on the toy: the guide converges to the posterior")
fig.tight_layout()

# %%
assert kl_end < 0.1 * kl_start and kl_end < 0.05

# %% [markdown]
# The same run through the library's backend (`method="svi"`, here with the loop's settings above:
# constant step size, no clipping; its defaults decay the step size and clip the gradient norm):
# it trains the guide the same way
# and then importance-weights guide draws against the exact target, so its $\log \hat Z$ is
# unbiased whatever the guide. Given the exact $\log Z$ as `log_evidence_ref` its trace also
# reports $\log Z - \widehat{\mathrm{ELBO}}$ per step.

# %%
post_svi = ppl_lm.infer(toy_model, method="svi", num_steps=steps, num_particles=16, lr=0.1, lr_decay=1.0,
                        clip_norm=None, num_samples=1000, log_evidence_ref=log_Z, seed=0, progress=False)
kl_backend = exact_terms(post_svi.guide)["kl_post"]
print(f"method='svi': exact KL(q‖π') of its guide = {kl_backend:.4f}; "
      f"log Ẑ = {post_svi.log_evidence:.4f} ± {post_svi.log_evidence_se:.4f} (exact {log_Z:.4f}); "
      f"ESS = {post_svi.ess:.0f} of 1000")

# %%
assert kl_backend < 0.1 * kl_start
assert abs(post_svi.log_evidence - log_Z) < 4 * post_svi.log_evidence_se + 1e-3

# %% [markdown]
# ## 3. Forward or reverse KL: a posterior with two modes
#
# The reverse KL $\mathrm{KL}(q\|\pi')$ (the ELBO) pays for mass $q$ puts where $\pi'$ has little; the
# forward KL $\mathrm{KL}(\pi'\|q)$ pays for mass $\pi'$ has where $q$ has little. When the guide family
# cannot represent $\pi'$ they pick different guides. Here the reward pays $\lambda = 4$ for
# $x_0 = x_2 \in \{a, c\}$: two modes, and the positional Markov guide sees $x_2$ only through $x_1$,
# so it cannot hold both exactly. `objective="forward"` trains $q$ by self-normalised
# importance-weighted maximum likelihood on its own draws (weights $\pi e^{r/\beta}/q$); same
# guide, same steps, same draws as the reverse run. Every number below is exact (enumeration).

# %%
def two_modes():
    x = pyro.sample("x", toy.sequence([], max_new_tokens=T_toy))
    mode = ((x[..., 0] == 1) & (x[..., 2] == 1)) | ((x[..., 0] == 3) & (x[..., 2] == 3))
    ppl_lm.reward("r", 4.0 * mode.float(), beta=1.0)
    return x


exact2 = ppl_lm.infer(two_modes, method="exact")
minor = (seqs[:, 0] == 1) & (seqs[:, 2] == 1)
major = (seqs[:, 0] == 3) & (seqs[:, 2] == 3)


def two_mode_terms(guide):
    with torch.no_grad():
        t = particle_terms(two_modes, guide, (), {}, len(seqs), values={"x": seqs})
    lq = t.log_q.double()
    lpost = (t.log_prior + t.log_likelihood).double() - exact2.log_evidence
    q, p = lq.exp(), lpost.exp()
    return {"KL(q‖π′)": float((q * (lq - lpost)).sum()), "KL(π′‖q)": float((p * (lpost - lq)).sum()),
            "minor mode": float(q[minor].sum()), "major mode": float(q[major].sum())}


lpost2 = two_mode_terms(make_guide(two_modes))  # at the prior
t_exact = particle_terms(two_modes, make_guide(two_modes), (), {}, len(seqs), values={"x": seqs})
p2 = ((t_exact.log_prior + t_exact.log_likelihood).double() - exact2.log_evidence).exp().detach()
rows2 = {"exact posterior": {"minor mode": float(p2[minor].sum()), "major mode": float(p2[major].sum())},
         "prior (start)": lpost2}
steps2 = 600  # the same in smoke mode: the toy is cheap
posts2 = {}
for objective in ("reverse", "forward"):
    posts2[objective] = ppl_lm.infer(two_modes, method="svi", objective=objective, num_steps=steps2,
                                     num_particles=32, lr=0.1, num_samples=2000, seed=0, progress=False)
    rows2[objective] = {**two_mode_terms(posts2[objective].guide),
                        "log Ẑ (guide IS)": posts2[objective].log_evidence}
print(f"exact log Z = {exact2.log_evidence:.4f}")
for name, row in rows2.items():
    print(f"{name:16s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.2))
names = ["exact posterior", "reverse", "forward"]
for i, key in enumerate(["minor mode", "major mode"]):
    ax.bar(np.arange(3) + 0.38 * i, [rows2[n][key] for n in names], width=0.36, label=key)
ax.set_xticks(np.arange(3) + 0.19, ["exact π′", "q, reverse KL", "q, forward KL"])
ax.set_ylabel("probability")
ax.set_title("mass on the two modes (exact)")
ax.legend()
fig.tight_layout()

# %%
r_, f_ = rows2["reverse"], rows2["forward"]
assert f_["KL(π′‖q)"] < r_["KL(π′‖q)"] and r_["KL(q‖π′)"] < f_["KL(q‖π′)"]
assert abs(f_["minor mode"] - rows2["exact posterior"]["minor mode"]) < abs(
    r_["minor mode"] - rows2["exact posterior"]["minor mode"])

# %% [markdown]
# Each objective wins its own direction. The reverse-trained guide under-weights the minor mode,
# and importance sampling with it as proposal cannot see what it never proposes: its $\log\hat Z$
# comes out low. The forward-trained guide spreads its mass over both modes, so its weights
# (and $\log\hat Z$) are closer to exact. (`method="svi"` also runs a guide-vs-prior cross-check
# after training and warns, `svi_misses_mass`, when the guide's $\log\hat Z$ falls below prior
# importance sampling's by more than its error.)

# %% [markdown]
# ## 4. LoRA fine-tuning of SmolLM2 toward positive sentiment
#
# The model is `models/sentiment.py`: continuations of a movie-review opening, reward = VADER
# compound sentiment in $[-1, 1]$, temperature $\beta$. The guide is SmolLM2 with LoRA adapters
# (rank 8 on the attention projections), trained on the CPU with each objective (the library's
# defaults: Adam at 2e-3 decaying tenfold over the run, gradient norm clipped at 1). Every step
# the trace records $\mathbb{E}_q[r]$, $\mathrm{KL}(q\|\pi)$ and the ELBO from its particles, and
# $\beta\cdot\mathrm{ELBO} = \mathbb{E}_q[r] - \beta\,\mathrm{KL}(q\|\pi)$ holds per step by construction.

# %%
from ppl_lm.models import sentiment

if SMOKE:
    lm = ppl_lm.tiny_char_transformer(seed=0)
    T, beta_s, n_steps, n_particles, lr, N = 8, 0.25, 6, 4, 5e-3, 32
else:
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # hide the GGUF conversion progress bars
        lm = ppl_lm.load_lm()
    print(f"loaded SmolLM2 in {time.perf_counter() - t0:.0f} s")
    T, beta_s, n_steps, n_particles, lr, N = 12, 0.25, 80, 8, None, 128
prompt = sentiment.context
model = sentiment.build(lm, beta=beta_s, max_new_tokens=T)

t0 = time.perf_counter()
prior_post = ppl_lm.infer(model, prompt, method="importance", num_samples=N, seed=1, progress=False)
t_prior = time.perf_counter() - t0
r_prior = prior_post.stats["reward:sentiment"]
print(f"prior: E_π[r] = {r_prior.mean():.3f} ± {r_prior.std() / math.sqrt(N):.3f};  "
      f"log Ẑ (IS, prior proposal) = {prior_post.log_evidence:.3f} ± {prior_post.log_evidence_se:.3f}; "
      f"{t_prior:.0f} s")

posts = {}
for objective in ("reverse", "forward"):
    t0 = time.perf_counter()
    posts[objective] = ppl_lm.infer(model, prompt, method="svi", objective=objective, guide="lora",
                                    num_steps=n_steps, num_particles=n_particles, lr=lr, num_samples=N,
                                    log_evidence_ref=prior_post.log_evidence, seed=0, progress=False)
    info = posts[objective].info
    c = info.crosscheck
    print(f"SVI, {objective} KL: {n_steps} steps × {n_particles} particles in {info.train_time:.0f} s "
          f"({info.seconds_per_step:.1f} s/step); total {time.perf_counter() - t0:.0f} s. Cross-check with "
          f"{c.num_samples} prior draws: KL(q‖π′) = {c.kl_reverse:.3f} ± {c.kl_reverse_se:.3f} "
          f"(at the prior {c.kl_at_prior:.3f} ± {c.kl_at_prior_se:.3f}), KL(π′‖q) = {c.kl_forward:.3f} ± "
          f"{c.kl_forward_se:.3f}; warnings: {[w.code for w in posts[objective].warnings] or 'none'}")
post = posts["reverse"]

# %%
tr = post.info.trace
steps_s = np.arange(1, len(tr["elbo"]) + 1)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
axes[0].plot(steps_s, tr["reward:sentiment"], ".-")
axes[0].axhline(float(r_prior.mean()), color="k", ls="--", lw=1, label="prior E_π[r]")
axes[0].set_title("E_q[r] per step (sentiment)")
axes[0].legend()
axes[1].plot(steps_s, tr["kl_prior"], ".-", color="C1")
axes[1].set_title("KL(q‖π) per step")
axes[2].plot(steps_s, beta_s * tr["elbo"], ".-", color="C2", label="β·ELBO")
axes[2].plot(steps_s, tr["reward:sentiment"] - beta_s * tr["kl_prior"], "x", color="k",
             label="E_q[r] − β·KL(q‖π)")
axes[2].set_title("the RL objective is β·ELBO")
axes[2].legend()
for a in axes:
    a.set_xlabel("SVI step")
fig.tight_layout()

# %%
gap = np.abs(beta_s * tr["elbo"] - (tr["reward:sentiment"] - beta_s * tr["kl_prior"])).max()
print(f"max per-step |β·ELBO − (E_q[r] − β·KL(q‖π))| = {gap:.2e}")
assert gap < 1e-4

# %% [markdown]
# ### log Z − ELBO = KL(q‖π') on SmolLM2
#
# Fresh draws from the trained guide give $\widehat{\mathrm{ELBO}} = \mathrm{mean}(\log\pi + r/\beta - \log q)$
# with its standard error; $\log \hat Z$ comes from two independent importance samplers (prior
# proposal, and the guide as proposal, returned by `method="svi"`), pooled (both estimate $Z$
# without bias, so their mean does too). $\log \hat Z - \widehat{\mathrm{ELBO}}$ estimates $\mathrm{KL}(q\|\pi') \ge 0$.
# Where training started ($q = \pi$) the ELBO is $\mathbb{E}_\pi[r]/\beta$, so the same $\log \hat Z$ also gives
# $\mathrm{KL}(\pi\|\pi')$, and the difference of the two KLs is exactly the ELBO gained by training.

# %%
g = post.guide
with torch.no_grad():
    xs = post.samples  # guide draws (importance-weighted against π' in `post`)
    log_q = g.lm.score(prompt, xs).double()
    log_p = lm.score(prompt, xs).double()
r_q = post.stats["reward:sentiment"].double()
f = log_p + r_q / beta_s - log_q
elbo_hat, elbo_se = float(f.mean()), float(f.std() / math.sqrt(len(f)))
kl_prior_hat = float((log_q - log_p).mean())
rows = {
    "log Ẑ, prior proposal": (prior_post.log_evidence, prior_post.log_evidence_se),
    "log Ẑ, guide proposal": (post.log_evidence, post.log_evidence_se),
    "ELBO (guide draws)": (elbo_hat, elbo_se),
}
for k, (v, s) in rows.items():
    print(f"{k:24} {v:8.4f} ± {s:.4f}")
# Pool the two unbiased estimates of Z (equal sample sizes): log of their mean, delta-method se.
lz = np.array([prior_post.log_evidence, post.log_evidence])
wz = np.exp(lz - lz.max()) / np.exp(lz - lz.max()).sum()
log_z = float(np.logaddexp(*lz) - math.log(2))
log_z_se = float(np.hypot(*(wz * np.array([prior_post.log_evidence_se, post.log_evidence_se]))))
print(f"{'log Ẑ, pooled':24} {log_z:8.4f} ± {log_z_se:.4f}")
kl_post_hat = log_z - elbo_hat
kl_post_se = math.hypot(log_z_se, elbo_se)
print(f"KL(q‖π') = log Ẑ − ELBO    = {kl_post_hat:.4f} ± {kl_post_se:.4f}")
print(f"KL(q‖π)                  = {kl_prior_hat:.4f};  E_q[r] = {r_q.mean():.3f} vs E_π[r] = {r_prior.mean():.3f}")
print(f"posterior E_π'[r] (IS, prior proposal) = {prior_post.expectation(r_prior):.3f}")
# Where training started: q = π, ELBO = E_π[r]/β, so KL(π‖π') = log Z − E_π[r]/β.
elbo_start, elbo_start_se = float(r_prior.mean()) / beta_s, float(r_prior.std()) / math.sqrt(N) / beta_s
kl_at_prior = log_z - elbo_start
kl_at_prior_se = math.hypot(log_z_se, elbo_start_se)
print(f"KL(π‖π') at the start (q = π)   = {kl_at_prior:.4f} ± {kl_at_prior_se:.4f}")
print(f"ELBO gained by training        = {elbo_hat - elbo_start:+.4f} ± {math.hypot(elbo_se, elbo_start_se):.4f} "
      f"(from {elbo_start:.4f} to {elbo_hat:.4f})")

# %%
# Both log Z estimators target the same number; KL(q‖π') is non-negative up to its error.
se_z = math.hypot(prior_post.log_evidence_se, post.log_evidence_se)
assert abs(prior_post.log_evidence - post.log_evidence) < 4 * se_z + 0.05
assert kl_post_hat > -4 * kl_post_se - 0.02

# %%
print("guide samples, highest sentiment first:")
order = torch.argsort(r_q, descending=True)
for i in order[:4].tolist():
    print(f"  r={r_q[i]:+.2f}  {prompt + post.texts[i]!r}")
print("prior samples:")
for i in range(3):
    print(f"  r={r_prior[i]:+.2f}  {prompt + prior_post.texts[i]!r}")

# %% [markdown]
# ## What the numbers say

# %%
print(f"Toy, exact: ELBO = (E_q[r] − β·KL(q‖π))/β to {abs(e['elbo'] - (e['reward'] - beta * e['kl_prior']) / beta):.1e}; "
      f"log Z − ELBO = KL(q‖π') to {abs(log_Z - e['elbo'] - e['kl_post']):.1e}.")
print(f"Toy SVI: KL(q‖π') {kl_start:.3f} → {kl_end:.4f} nats in {steps} steps.")
print(f"SmolLM2 LoRA, {n_steps} steps: E_q[r] {r_q.mean():.3f} vs E_π[r] {r_prior.mean():.3f}; "
      f"KL(q‖π) = {kl_prior_hat:.3f}; KL(q‖π') = {kl_post_hat:.3f} ± {kl_post_se:.3f} "
      f"(at the prior: {kl_at_prior:.3f} ± {kl_at_prior_se:.3f}).")

# %% [markdown]
# **Reading the numbers.**
#
# - *The identities are exact.* On the toy, by enumeration, $\mathrm{ELBO} = (\mathbb{E}_q[r] - \beta\,\mathrm{KL}(q\|\pi))/\beta$ to
#   $2\cdot10^{-9}$ and $\log Z - \mathrm{ELBO} = \mathrm{KL}(q\|\pi')$ to $2\cdot10^{-8}$ for an arbitrary $q$; on SmolLM2
#   $\beta\cdot\mathrm{ELBO} = \mathbb{E}_q[r] - \beta\,\mathrm{KL}(q\|\pi)$ holds at every step to $1.9\cdot10^{-7}$. Fine-tuning with
#   the KL-regularised reward and maximising the ELBO are the same optimisation.
# - *SVI converges on the toy.* With a guide family that contains the posterior, the exact
#   $\mathrm{KL}(q\|\pi')$ falls from 0.60 to 0.010 nats in 300 steps, and the backend's importance
#   correction gives $\log \hat Z = -0.2562 \pm 0.0042$ (exact $-0.2553$) with ESS 982 of 1000.
# - *On SmolLM2 the fine-tune moves toward the posterior but does not reach it in 10 minutes.*
#   Measured by `benchmarks/svi_target.py` at full length (`benchmarks/RESULTS.md` §3b, session 4:
#   10 CPU minutes of one thread per objective on a 2-core machine shared with another job, 3.8–4.0
#   CPU s a step, so 150–158 steps; the library's defaults: LoRA r = 8, Adam 2e-3 decaying tenfold,
#   norm clip 1, 8 draws a step). The reference is prior importance sampling with 2048 draws,
#   $\log\hat Z = 1.746 \pm 0.030$, so $\mathrm{KL}(\pi\|\pi') = 0.90 \pm 0.04$ at the start (1.04 on the
#   evaluation's own 256 draws). Reverse-KL training reached $\mathrm{KL}(q\|\pi') = 0.57 \pm 0.08$ at
#   580 CPU s (best evaluation $0.42 \pm 0.07$ at 459 s) and $\mathrm{KL}(\pi'\|q) = 0.41 \pm 0.06$ (from
#   0.72); forward-KL training $0.57 \pm 0.08$ at 610 s ($0.44 \pm 0.08$ at 669 s) and
#   $\mathrm{KL}(\pi'\|q) = 0.31 \pm 0.05$. No collapse warning in either run. So on SmolLM2 the claim
#   holds exactly as an identity (per step, above) and as a direction (about half of the KL removed in
#   10 minutes), but the 0.2-nat target is missed by 0.2–0.35 nats: at this cost per step, 150 steps
#   are not enough, and every larger step tried (lr 5e-3, LoRA on all linear layers) overshoots; 16
#   draws a step (sharing the prompt's KV cache, 1.4× the cost) was level at equal time.
#   This notebook's own SmolLM2 run (committed, 2026-12-02, load about 3) is shorter: 80 steps × 8
#   draws per objective, 4.0 s a step, 322 s of training each. Against 128 prior draws
#   ($\mathrm{KL}(\pi\|\pi') = 0.90 \pm 0.17$ at the start), reverse training ends at
#   $\mathrm{KL}(q\|\pi') = 0.33 \pm 0.15$ and forward at $0.46 \pm 0.16$, both with
#   $\mathrm{KL}(\pi'\|q) \approx 0.60 \pm 0.14$ and no warning. For the reverse guide, the pooled
#   estimate is $\mathrm{KL}(q\|\pi') = 0.46 \pm 0.12$ (ELBO gained $+0.43 \pm 0.16$ nats, $E_q[r]$ 0.42 vs
#   $E_\pi[r]$ 0.22). Session 3's 40-step run gained $+0.08 \pm 0.18$. With these small samples the
#   errors are wide; the direction is clear.
# - *Forward or reverse.* On the two-mode toy (section 3, exact) each objective wins its own
#   direction: forward KL covers the minor mode that reverse KL under-weights, and the reverse
#   guide's importance-sampling $\log\hat Z$ comes out low because its weights cannot see the mass it
#   does not propose. On SmolLM2's sentiment tilt (one broad mode) the two are level in
#   $\mathrm{KL}(q\|\pi')$ at equal time (0.57 and 0.57 nats after 10 CPU minutes), and forward training
#   ends closer in its own direction, $\mathrm{KL}(\pi'\|q)$ 0.31 against 0.41. On the conformance toys
#   both reach $\le 0.01$ nats in both directions (`tests/test_svi.py`), and forward KL with its
#   baseline converged fastest of the estimators measured (`benchmarks/RESULTS.md` §3c).
# - *The correction makes the result exact anyway.* `method="svi"` importance-weights the trained
#   guide's draws against the exact target and cross-checks them against prior importance sampling,
#   so a partly trained guide is still a valid proposal, and a guide that misses mass is flagged.
