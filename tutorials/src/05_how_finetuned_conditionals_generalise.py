# %% [markdown]
# # 5. How fine-tuned conditionals generalise
#
# **Claim.** A guide trained by SVI on some contexts is an *amortised* posterior: the same LoRA
# weights condition every context, including contexts it never saw. What it learned can be read in
# two ways, and they make different predictions:
#
# - **"restricted text"**: the fine-tune reweights texts by their reward. This is what the
#   posterior itself does: $\pi'(x \mid c) = \pi(x \mid c)\,e^{r(x)/\beta}/Z(c)$, so for two complete
#   texts $a, b$ the change in log-probability is exactly $\Delta(a) - \Delta(b) = (r(a) - r(b))/\beta$,
#   with $\Delta = \log q - \log \pi$. Texts with the same reward keep their relative probabilities.
# - **"kinder world"**: the fine-tune changes what the model expects to *happen*, so good events
#   gain probability over bad ones even when both are described in neutral words of equal reward.
#
# We train a LoRA guide on SmolLM2 toward positive sentiment (VADER, $\beta = 0.25$) on a set of
# review-like contexts, measure reward and KL on held-out contexts, then probe the two readings
# with pairs of texts: *wording* pairs (same event, positive vs negative words) and *world* pairs
# (good vs bad event, neutral words). The exact posterior predicts $\Delta(a) - \Delta(b) = (r(a) -
# r(b))/\beta$ for every pair; the kinder-world reading predicts more than that for world pairs.

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

import ppl_lm
from ppl_lm import rewards
from ppl_lm.models import sentiment

%matplotlib inline
SMOKE = ppl_lm.notebook.setup()  # one torch thread (PPL_LM_THREADS), smoke mode (PPL_LM_SMOKE=1)
LM_NAME = "tiny LM" if SMOKE else "SmolLM2"

# %%
train_contexts = [
    "I watched the new movie last night and",
    "The food at this restaurant was",
    "My flight this morning was",
    "The hotel room we booked was",
    "The new phone I bought is",
    "The concert on Saturday was",
]
heldout_contexts = [
    "The service at the bank today was",
    "My first day at the new job was",
    "The weather on our holiday was",
]
if SMOKE:
    lm = ppl_lm.tiny_char_transformer(seed=0)
    T, beta, n_steps, n_particles, lr, N = 8, 0.25, 6, 4, 5e-3, 16
else:
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # hide the GGUF conversion progress bars
        lm = ppl_lm.load_lm()
    print(f"loaded SmolLM2 in {time.perf_counter() - t0:.0f} s")
    T, beta, n_steps, n_particles, lr, N = 12, 0.25, 60, 8, 2e-3, 64
model = sentiment.build(lm, beta=beta, max_new_tokens=T)

t0 = time.perf_counter()
post = ppl_lm.infer(model, train_contexts[0], method="svi", guide="lora", contexts=train_contexts,
                    num_steps=n_steps, num_particles=n_particles, lr=lr, num_samples=N, seed=0, progress=False)
guide = post.guide
print(f"SVI over {len(train_contexts)} contexts: {n_steps} steps × {n_particles} draws, "
      f"{post.info.seconds_per_step:.1f} s/step, {time.perf_counter() - t0:.0f} s in all")

# %% [markdown]
# ## Reward and KL on training and held-out contexts
#
# For every context: $N$ draws from the prior (IS with the prior as proposal also estimates
# $\log Z(c)$ and the posterior reward $\mathbb{E}_{\pi'}[r]$) and $N$ draws from the guide (IS with the
# guide as proposal). From the guide's draws: $\mathbb{E}_q[r]$, $\mathrm{KL}(q\|\pi) = \mathbb{E}_q[\log q - \log \pi]$
# and $\mathrm{KL}(q\|\pi') = \log Z - \mathrm{ELBO}$ (with $\log Z$ pooled from the two samplers); the next
# column is where training started, $\mathrm{KL}(\pi\|\pi') = \log Z - \mathbb{E}_\pi[r]/\beta$, and the last is
# their difference, the ELBO gained by training, with its standard error.
#
# Both samplers run over all six contexts in one call each (`contexts=`: one Posterior per context;
# the prior's draws of the six contexts share LM batches, and context i runs under its own seed).

# %%
def evaluate(ctx, prior, gpost):
    with torch.no_grad():
        log_q = guide.lm.score(ctx, gpost.samples).double()
    log_p = gpost.stats["log_prior"].double()
    r_q = gpost.stats["reward:sentiment"].double()
    r_p = prior.stats["reward:sentiment"].double()
    f = log_p + r_q / beta - log_q
    # Both IS estimates of Z are unbiased: pool them (log of the mean) for the KLs below, so that
    # KL(q‖π') − KL(π‖π') is exactly the ELBO gained, free of the log Z estimate.
    lz = np.array([prior.log_evidence, gpost.log_evidence])
    wz = np.exp(lz - lz.max()) / np.exp(lz - lz.max()).sum()
    log_z = float(np.logaddexp(*lz) - math.log(2))
    log_z_se = float(np.hypot(*(wz * np.array([prior.log_evidence_se, gpost.log_evidence_se]))))
    return dict(
        r_prior=float(r_p.mean()), r_prior_se=float(r_p.std() / math.sqrt(N)),
        r_guide=float(r_q.mean()), r_guide_se=float(r_q.std() / math.sqrt(N)),
        r_post=prior.expectation(r_p),
        kl_prior=float((log_q - log_p).mean()), kl_prior_se=float((log_q - log_p).std() / math.sqrt(N)),
        kl_post=log_z - float(f.mean()),
        # where the guide started (q = π): KL(π‖π') = log Z − E_π[r]/β, from the prior draws
        kl_post_at_prior=log_z - float(r_p.mean()) / beta,
        kl_post_se=math.hypot(log_z_se, float(f.std() / math.sqrt(N))),
        elbo_gain=float(f.mean()) - float(r_p.mean()) / beta,
        elbo_gain_se=math.hypot(float(f.std()), float(r_p.std()) / beta) / math.sqrt(N),
        log_z=(prior.log_evidence, prior.log_evidence_se), log_z_guide=(gpost.log_evidence, gpost.log_evidence_se),
        example=ctx + gpost.texts[int(torch.argmax(r_q))],
    )


t0 = time.perf_counter()
probe = train_contexts[:3] + heldout_contexts
priors = ppl_lm.infer(model, contexts=probe, method="importance", num_samples=N, seed=100, progress=False)
gposts = ppl_lm.infer(model, contexts=probe, method="importance", guide=guide, num_samples=N, seed=100, progress=False)
evals = {ctx: evaluate(ctx, prior, gpost) for ctx, prior, gpost in zip(probe, priors, gposts)}
print(f"evaluated {len(evals)} contexts in {time.perf_counter() - t0:.0f} s")
print(f"{'context':42} {'split':8} {'E_π[r]':>7} {'E_q[r]':>7} {'E_π′[r]':>8} {'KL(q‖π)':>8} {'KL(q‖π′)':>9} "
      f"{'KL(π‖π′)':>9} {'ELBO gain':>14}")
for ctx, e in evals.items():
    split = "held-out" if ctx in heldout_contexts else "train"
    print(f"{ctx[:42]:42} {split:8} {e['r_prior']:7.3f} {e['r_guide']:7.3f} {e['r_post']:8.3f} "
          f"{e['kl_prior']:8.3f} {e['kl_post']:9.3f} {e['kl_post_at_prior']:9.3f} "
          f"{e['elbo_gain']:+7.3f} ± {e['elbo_gain_se']:.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
ctxs = list(evals)
xs = np.arange(len(ctxs))
colors = ["C0" if c in heldout_contexts else "C7" for c in ctxs]
axes[0].errorbar(xs - 0.15, [evals[c]["r_prior"] for c in ctxs], yerr=[2 * evals[c]["r_prior_se"] for c in ctxs],
                 fmt="o", color="k", label="prior E_π[r]")
axes[0].errorbar(xs + 0.15, [evals[c]["r_guide"] for c in ctxs], yerr=[2 * evals[c]["r_guide_se"] for c in ctxs],
                 fmt="s", color="C2", label="guide E_q[r]")
axes[0].plot(xs, [evals[c]["r_post"] for c in ctxs], "*", color="C3", ms=10, label="posterior E_π′[r] (IS)")
axes[0].set_title("reward (±2 se); grey: training contexts, blue: held-out")
axes[0].legend(fontsize=8)
axes[1].bar(xs - 0.2, [evals[c]["kl_prior"] for c in ctxs], 0.4, color=colors, label="KL(q‖π)")
axes[1].bar(xs + 0.2, [evals[c]["kl_post"] for c in ctxs], 0.4, color=colors, alpha=0.4, hatch="//",
            label="KL(q‖π′) = log Z − ELBO")
axes[1].set_title("KL per context (nats)")
axes[1].legend(fontsize=8)
for a in axes:
    a.set_xticks(xs, [c[:18] + "…" for c in ctxs], rotation=30, ha="right", fontsize=8)
fig.tight_layout()

# %%
# Both log Z estimators (prior proposal, guide proposal) agree on every context, trained or not:
# the correction by importance sampling is exact whatever the guide learned.
for ctx, e in evals.items():
    (a, sa), (b, sb) = e["log_z"], e["log_z_guide"]
    assert abs(a - b) < 4 * math.hypot(sa, sb) + 0.1, ctx
    assert e["kl_prior"] > -4 * e["kl_prior_se"] - 0.02, ctx

# %% [markdown]
# ## Probing the two readings
#
# Each probe is a complete continuation (EOS included) of the same neutral context, scored under
# the guide (`guide.lm.score`) and the prior (`lm.score`); $\Delta = \log q - \log \pi$. For a pair
# $(a, b)$ the exact posterior predicts $\Delta(a) - \Delta(b) = (r(a) - r(b))/\beta$, where $r$ is the
# VADER score of the continuation.

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


def deltas(texts):
    ids = [lm.encode(t) + [lm.eos_id] for t in texts]
    L = max(len(i) for i in ids)
    x = torch.tensor([i + [lm.eos_id] * (L - len(i)) for i in ids])
    with torch.no_grad():
        lq = guide.lm.score(probe_context, x).double()
        lp = lm.score(probe_context, x).double()
    r = rewards.sentiment(lm, x).double()
    return (lq - lp).numpy(), r.numpy()


def pair_stats(pairs, B=2000, seed=0):
    da, ra = deltas([a for a, _ in pairs])
    db, rb = deltas([b for _, b in pairs])
    measured, predicted = da - db, (ra - rb) / beta
    rng = np.random.default_rng(seed)
    boot = rng.choice(measured, size=(B, len(measured))).mean(1)
    return dict(measured=measured, predicted=predicted, r_gap=ra - rb, mean=measured.mean(),
                ci=np.percentile(boot, [2.5, 97.5]), se=measured.std(ddof=1) / math.sqrt(len(measured)))


probes = {"wording": pair_stats(wording_pairs), "world": pair_stats(world_pairs)}
for name, s in probes.items():
    print(f"{name:8} pairs: mean Δ(a)−Δ(b) = {s['mean']:+.4f} nats, 95% bootstrap CI [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}]; "
          f"mean reward gap r(a)−r(b) = {s['r_gap'].mean():+.3f} (posterior predicts {s['predicted'].mean():+.2f} nats)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for i, (name, s) in enumerate(probes.items()):
    axes[0].scatter(s["r_gap"], s["measured"], color=f"C{i}", label=f"{name} pairs")
allgap = np.concatenate([s["r_gap"] for s in probes.values()])
allmeas = np.concatenate([s["measured"] for s in probes.values()])
coef = np.polyfit(allgap, allmeas, 1) if np.ptp(allgap) > 0 else np.array([np.nan, np.nan])
slope = float(coef[0])
grid = np.linspace(allgap.min() - 0.1, allgap.max() + 0.1, 2)
if np.isfinite(slope):
    axes[0].plot(grid, np.polyval(coef, grid), color="k", lw=1,
                 label=f"fit: {coef[0]:.2f}·gap {coef[1]:+.2f} (nats per unit of r)")
axes[0].plot(grid, grid / beta, color="C3", lw=1, ls="--", label=f"exact posterior: gap/β")
axes[0].axhline(0, color="grey", lw=0.5)
axes[0].set_xlabel("r(a) − r(b) (VADER)")
axes[0].set_ylabel("Δ(a) − Δ(b) (nats)")
axes[0].set_title("guide vs prior on probe pairs")
axes[0].legend(fontsize=8)
names = list(probes)
axes[1].bar(names, [probes[n]["mean"] for n in names], color=["C0", "C1"],
            yerr=np.array([[probes[n]["mean"] - probes[n]["ci"][0], probes[n]["ci"][1] - probes[n]["mean"]]
                           for n in names]).T, capsize=6)
axes[1].axhline(0, color="grey", lw=0.5)
axes[1].set_title("mean Δ(a) − Δ(b) with 95% bootstrap CI")
fig.tight_layout()

# %%
# The guide started at the prior (LoRA B = 0): every Δ is bounded by how far training moved it.
# The probes are finite, complete texts, and the shifts are finite numbers.
for s in probes.values():
    assert np.isfinite(s["measured"]).all() and s["ci"][0] <= s["mean"] <= s["ci"][1]
# World pairs have equal VADER scores, so the exact posterior predicts no shift at all for them;
# wording pairs differ by about one unit of reward, a predicted shift of about 1/β nats.
assert np.allclose(probes["world"]["r_gap"], 0) and (probes["wording"]["r_gap"] > 0.5).all()

# %% [markdown]
# ## What the numbers say

# %%
tr = [e for c, e in evals.items() if c not in heldout_contexts]
ho = [e for c, e in evals.items() if c in heldout_contexts]
mean = lambda rows, k: float(np.mean([e[k] for e in rows]))  # noqa: E731
for label, rows in (("training", tr), ("held-out", ho)):
    print(f"{label} contexts: E_q[r] {mean(rows, 'r_guide'):.3f} vs E_π[r] {mean(rows, 'r_prior'):.3f} "
          f"(posterior {mean(rows, 'r_post'):.3f}); KL(q‖π) {mean(rows, 'kl_prior'):.3f}; "
          f"KL(q‖π′) {mean(rows, 'kl_post'):.3f} vs KL(π‖π′) {mean(rows, 'kl_post_at_prior'):.3f} at the start "
          f"(ELBO gain {mean(rows, 'elbo_gain'):+.3f} ± {math.sqrt(sum(e['elbo_gain_se'] ** 2 for e in rows)) / len(rows):.3f})")
for name, s in probes.items():
    print(f"{name} pairs: Δ(a)−Δ(b) = {s['mean']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}] nats; "
          f"the exact posterior would give {s['predicted'].mean():+.2f}")

# %% [markdown]
# **Reading the committed run (SmolLM2).**
#
# - *The amortised guide generalises.* After 60 LoRA steps spread over six training contexts, the
#   mean reward rose from 0.213 to 0.362 on three of the training contexts and from 0.164 to 0.335 on
#   three held-out ones, a similar gain on contexts it never saw, at a similar cost,
#   $\mathrm{KL}(q\|\pi) \approx 0.45$-$0.49$ nats. It is still far from the posterior (mean $\mathbb{E}_{\pi'}[r]$ 0.58
#   and 0.55): the ELBO gained $+0.11 \pm 0.13$ nats on the training contexts and $+0.23 \pm 0.12$ on the
#   held-out ones, within one and two standard errors of zero. As in notebook 2, a few CPU minutes of SVI
#   trade KL for reward at nearly the rate the ELBO sets, and the correction by importance sampling
#   keeps every estimate exact.
# - *"Restricted text" fits; "kinder world" is not seen, within a wide error.* On wording pairs
#   (same event, positive vs negative words, VADER gap about 1.1) the guide shifted log-probability by
#   $+0.80$ nats [0.52, 1.14], in the direction of the posterior but at 18% of its size (the exact
#   posterior gives $+4.46$). On world pairs (good vs bad event, identical VADER score, so the
#   posterior predicts exactly 0) the shift is $-0.02$ nats [$-0.25$, $+0.25$]: consistent with zero,
#   which is what the restricted-text reading and the posterior itself predict. The fit across all
#   probes, $0.73 \times$ gap $- 0.01$, puts the change on the reward, not on the events.
# - *What the numbers cannot say.* Eight world pairs give a 95% interval half a nat wide, and single
#   world pairs moved by $-0.6$ to $+0.7$ nats, so a kinder-world effect up to about 30% of the wording
#   effect is not excluded; nor does a guide this far from the posterior tell us what a converged
#   fine-tune would do. The probes also speak only for this reward: VADER scores words, so
#   "restricted text" is what its posterior asks for.
