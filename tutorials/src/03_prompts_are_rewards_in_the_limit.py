# %% [markdown]
# # 3. Prompts are rewards in the limit
#
# **Claim.** A prompt is the $\lambda \to \infty$ limit of a reward. Pin positions $S$ of the
# continuation to tokens $y$ with the reward $r_\lambda(x) = \lambda \sum_{i \in S} \delta(x_i, y_i)$
# (`ppl_lm.pin(name, x, {i: y_i}, lam)`); the soft conditional $\pi_\lambda(x) \propto \pi(x)\,e^{r_\lambda(x)}$
# tends to the hard one, $\pi(x \mid x_S = y)$ (`lam=None`), which is the LM prompted with $y$.
#
# How fast? Write $h(x)$ for the number of pinned positions that match and $p_j = \pi(h = j)$,
# $k = |S|$. Inside the set where every pin matches, $\pi_\lambda \propto \pi$, exactly as the hard
# conditional; the soft one only leaks mass outside it. Hence
#
# $$\mathrm{KL}\big(\pi(\cdot \mid x_S = y)\,\big\|\,\pi_\lambda\big)
#   = \log \frac{Z_\lambda}{p_k\,e^{k\lambda}}
#   = \log\Big(1 + \sum_{j<k} \frac{p_j}{p_k}\,e^{-(k-j)\lambda}\Big)
#   \approx \frac{p_{k-1}}{p_k}\,e^{-\lambda},$$
#
# and for one pinned token exactly $\log(1 + \tfrac{1-p}{p}e^{-\lambda})$: an $e^{-\lambda}$ decay with a
# constant $(1-p)/p$ that is large when the pinned token is unlikely. The other direction,
# $\mathrm{KL}(\pi_\lambda \| \pi(\cdot \mid x_S=y))$, is $+\infty$ for every finite $\lambda$
# ($\pi_\lambda$ puts mass where the pin fails, the hard conditional none), so we measure the
# finite direction and the total variation $\mathrm{TV} = \pi_\lambda(h < k)$.
#
# 1. Exact, on a toy LM: the exact backend for each $\lambda$ and for `lam=None`, KL and TV from the
#    two exact posteriors, against the formula.
# 2. Estimated, on SmolLM2: importance sampling of $\log Z_\lambda$ for each $\lambda$ and of
#    $\log Z_\infty = \log p_k$, then $\widehat{\mathrm{KL}} = \log \hat Z_\lambda - k\lambda - \log \hat Z_\infty$.

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

%matplotlib inline
SMOKE = ppl_lm.notebook.setup()  # one torch thread (PPL_LM_THREADS), smoke mode (PPL_LM_SMOKE=1)
LM_NAME = "tiny LM" if SMOKE else "SmolLM2"


def pin_model(lm, prompt, pins, lam, T):
    """The prompted LM with the positions in `pins` rewarded by lam each (lam=None: hard)."""

    def model():
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.pin("pin", x, pins, lam=lam)
        return x

    return model


def kl_and_tv(hard, soft):
    """KL(hard ‖ soft) and TV(hard, soft) from two exact posteriors."""
    p, q = hard.probabilities(), soft.probabilities()
    kl = sum(pv * (math.log(pv) - math.log(q[k])) for k, pv in p.items() if pv > 0)
    tv = 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))
    return kl, tv


# %% [markdown]
# ## 1. Exact, on a toy LM
#
# A Markov LM over `a b c d` (+ EOS), $T = 4$. We pin position 0 to each of three tokens of
# different prior probability $p$ (likely, middling, rare), and positions 0 and 1 to the likeliest
# pair that starts with the likeliest token ($k = 2$).

# %%
toy = ppl_lm.MarkovLM.random(5, eos_id=0, seed=2)
T_toy = 4
lams = np.arange(0, 12.5, 1.0) if not SMOKE else np.arange(0, 9, 2.0)
p0 = torch.softmax(toy.init_logits, -1)
ranked = [t for t in torch.argsort(p0, descending=True).tolist() if t != toy.eos_id]
tokens = [ranked[0], ranked[1], ranked[-1]]  # likely, middling and rare first tokens
cases = {f"x_0 = {toy.decode_token(t)}": {0: t} for t in tokens}
t0, t1 = tokens[0], int(torch.argmax(torch.softmax(toy.trans_logits[tokens[0]], -1)[1:])) + 1
cases[f"x_0 x_1 = {toy.decode_token(t0)}{toy.decode_token(t1)}"] = {0: t0, 1: t1}

toy_res = {}
for name, pins in cases.items():
    hard = ppl_lm.infer(pin_model(toy, [], pins, None, T_toy), method="exact")
    k = len(pins)
    # p_j = π(h = j), exactly, from the λ = 0 posterior (the prior) and the number of matches
    prior = ppl_lm.infer(pin_model(toy, [], pins, 0.0, T_toy), method="exact")
    pos = torch.tensor(list(pins))
    want = torch.tensor(list(pins.values()))
    h = (prior.samples[:, pos] == want).sum(-1)
    p_j = torch.stack([(prior.weights * (h == j)).sum() for j in range(k + 1)]).double()
    kls, tvs, theory = [], [], []
    for lam in lams:
        soft = ppl_lm.infer(pin_model(toy, [], pins, float(lam), T_toy), method="exact")
        kl, tv = kl_and_tv(hard, soft)
        kls.append(kl)
        tvs.append(tv)
        theory.append(math.log(1 + sum(float(p_j[j] / p_j[k]) * math.exp(-(k - j) * lam) for j in range(k))))
    toy_res[name] = dict(p=float(p_j[k]), k=k, kl=np.array(kls), tv=np.array(tvs), theory=np.array(theory),
                         const=float(p_j[k - 1] / p_j[k]), log_p=hard.log_evidence)
    print(f"{name:12}  p_k = π(all pins) = {p_j[k]:.4f} (exact log Z of lam=None: {hard.log_evidence:.4f}); "
          f"KL at λ=0: {kls[0]:.4f}, at λ={lams[-1]:.0f}: {kls[-1]:.2e}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for i, (name, r) in enumerate(toy_res.items()):
    axes[0].semilogy(lams, r["kl"], "o", color=f"C{i}", label=f"{name} (p={r['p']:.2f})")
    axes[0].semilogy(lams, r["theory"], "-", color=f"C{i}", lw=1)
    axes[0].semilogy(lams, r["const"] * np.exp(-lams), ":", color=f"C{i}", lw=1)
    axes[1].semilogy(lams, r["tv"], "o-", color=f"C{i}", label=name)
axes[0].set_xlabel("λ")
axes[0].set_title("KL(π(·|pins) ‖ π_λ): exact (dots), formula (line), (p_{k-1}/p_k)e^{-λ} (dotted)")
axes[0].legend(fontsize=8)
axes[1].set_xlabel("λ")
axes[1].set_title("TV(π(·|pins), π_λ) = π_λ(some pin fails)")
fig.tight_layout()

# %%
fit = {}
for name, r in toy_res.items():
    assert np.allclose(r["kl"], r["theory"], rtol=1e-3, atol=1e-7), name
    big = lams >= lams[-1] / 2
    fit[name] = np.polyfit(lams[big], np.log(r["kl"][big]), 1)[0]
    print(f"{name:12} slope of log KL vs λ for λ ≥ {lams[-1] / 2:.0f}: {fit[name]:.3f} (theory −1); "
          f"KL·e^λ at the largest λ: {r['kl'][-1] * math.exp(lams[-1]):.3f} vs p_(k-1)/p_k = {r['const']:.3f}")
    assert abs(fit[name] + 1) < 0.1

# %% [markdown]
# On the toy the exact KL and the formula agree to float precision, the log-KL slope is $-1$,
# and the constant is $p_{k-1}/p_k$: the rarer the pinned token, the larger $\lambda$ must be for
# the same accuracy (about $\log\frac{1-p}{p\varepsilon}$ for KL $\varepsilon$ with one pin).
#
# ## 2. Estimated, on SmolLM2
#
# We pin the first one and the first two tokens of the greedy continuation of a prompt. Each
# $\log Z_\lambda$ is estimated by importance sampling from the prompted LM, every run with the same
# seed, so the runs share their proposals (common random numbers) and the differences
# $\log \hat Z_\lambda - \log \hat Z_\infty$ are not swamped by independent noise. Only the pinned
# positions matter for $Z_\lambda$, so a few new tokens suffice. For one pin, $p$ is also known
# exactly (`lm.score` of the pinned token), which gives the exact curve to compare with.

# %%
if SMOKE:
    lm = ppl_lm.tiny_transformer(6, eos_id=0, seed=1, scale=0.15)
    prompt, T, N = [1, 2], 3, 256
    lams_lm = np.array([0.0, 1.0, 2.0, 4.0, 6.0])
else:
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # hide the GGUF conversion progress bars
        lm = ppl_lm.load_lm()
    print(f"loaded SmolLM2 in {time.perf_counter() - t0:.0f} s")
    prompt, T, N = "Once upon a time,", 3, 512
    lams_lm = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0])

# The greedy continuation: its tokens are the likeliest, but far from certain.
with torch.no_grad():
    st = lm.start(ppl_lm.tokens.as_prompt_tensor(prompt, lm), 1)
    y = []
    for _ in range(2):
        lp = st.logprobs[0].clone()
        lp[lm.eos_id] = -math.inf
        y.append(int(lp.argmax()))
        st = lm.extend(st, torch.tensor([y[-1]]))
    log_p1 = lm.score(prompt, torch.tensor([y[:1]])).item()
    log_p2 = lm.score(prompt, torch.tensor([y[:2]])).item()
print(f"prompt {prompt!r}; pinned tokens {[lm.decode_token(t) for t in y]}; "
      f"exact π(y_0) = {math.exp(log_p1):.4f}, π(y_0 y_1) = {math.exp(log_p2):.4f}")

est = {}
t0 = time.perf_counter()
for k in (1, 2):
    pins = {i: y[i] for i in range(k)}
    hard = ppl_lm.infer(pin_model(lm, prompt, pins, None, T), method="importance", num_samples=N, seed=0,
                        progress=False)
    rows = []
    for lam in lams_lm:
        soft = ppl_lm.infer(pin_model(lm, prompt, pins, float(lam), T), method="importance", num_samples=N,
                            seed=0, progress=False)
        rows.append((soft.log_evidence, soft.log_evidence_se))
    lz, se = map(np.array, zip(*rows))
    est[k] = dict(log_z_hard=hard.log_evidence, se_hard=hard.log_evidence_se, lz=lz, se=se,
                  kl=lz - k * lams_lm - hard.log_evidence)
print(f"{2 * (len(lams_lm) + 1)} importance runs of N={N} in {time.perf_counter() - t0:.0f} s")
for k in (1, 2):
    exact_lp = log_p1 if k == 1 else log_p2
    print(f"k={k}: log Ẑ_∞ = {est[k]['log_z_hard']:.4f} ± {est[k]['se_hard']:.4f} (exact log p = {exact_lp:.4f})")

# %%
kl_exact1 = np.log1p((1 - math.exp(log_p1)) / math.exp(log_p1) * np.exp(-lams_lm))
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.semilogy(lams_lm, kl_exact1, "-", color="C0", label="k=1, exact: log(1+(1−p)/p·e^{−λ})")
ax.semilogy(lams_lm, np.clip(est[1]["kl"], 1e-6, None), "o", color="C0", label="k=1, IS estimate")
ax.semilogy(lams_lm, np.clip(est[2]["kl"], 1e-6, None), "s", color="C1", label="k=2, IS estimate")
ax.set_xlabel("λ")
ax.set_ylabel("KL(π(·|pins) ‖ π_λ)")
ax.set_title(f"SmolLM2: pinning {[lm.decode_token(t) for t in y]} after {prompt!r}" if not SMOKE
             else "tiny transformer (smoke mode)")
ax.legend()
fig.tight_layout()

# %%
# With common random numbers, KL̂(λ) = log(Σ_j p̂_j e^{(j-k)λ} / p̂_k) where p̂_j are the hit
# frequencies of the shared sample: always ≥ 0, decreasing in λ, with slope → −1 on a log scale.
for k in (1, 2):
    kl = est[k]["kl"]
    assert (kl > -1e-6).all() and (np.diff(kl) < 1e-9).all(), k
    big = lams_lm >= 2
    slope = np.polyfit(lams_lm[big], np.log(np.clip(kl[big], 1e-12, None)), 1)[0]
    print(f"k={k}: fitted slope of log KL̂ vs λ (λ ≥ 2) = {slope:.3f} (theory → −1)")
    est[k]["slope"] = slope
# One pin: the IS estimate of log p is within 4 se of the exact lm.score value...
assert abs(est[1]["log_z_hard"] - log_p1) < 4 * est[1]["se_hard"] + 1e-6
# ...and the estimated KL curve tracks the exact one within its Monte Carlo error (p̂ vs p).
p1, se_p = math.exp(log_p1), est[1]["se_hard"]
lo = np.log1p((1 - p1 * math.exp(4 * se_p)) / (p1 * math.exp(4 * se_p)) * np.exp(-lams_lm))
hi = np.log1p((1 - p1 * math.exp(-4 * se_p)) / (p1 * math.exp(-4 * se_p)) * np.exp(-lams_lm))
assert ((est[1]["kl"] >= lo - 1e-9) & (est[1]["kl"] <= hi + 1e-9)).all()

# %% [markdown]
# ## What the numbers say

# %%
for name, r in toy_res.items():
    print(f"toy {name}: exact KL from {r['kl'][0]:.3f} (λ=0) to {r['kl'][-1]:.1e} (λ={lams[-1]:.0f}); "
          f"slope {fit[name]:.3f}; constant p_(k-1)/p_k = {r['const']:.2f}")
for k in (1, 2):
    print(f"{LM_NAME} k={k}: KL̂ from {est[k]['kl'][0]:.3f} (λ=0) to {est[k]['kl'][-1]:.1e} (λ={lams_lm[-1]:.0f}); "
          f"fitted slope {est[k]['slope']:.3f}")
print(f"{LM_NAME} k=1 exact: KL = {kl_exact1[0]:.3f} at λ=0, {kl_exact1[-1]:.1e} at λ={lams_lm[-1]:.0f}; "
      f"λ for KL < 0.01 nats: {math.log((1 - p1) / p1 / math.expm1(0.01)):.2f}")

# %% [markdown]
# **Reading the committed run (SmolLM2).**
#
# - *Toy, exact.* The KL computed from the two exact posteriors matches the closed form to float
#   precision for every $\lambda$; the log-KL slope is $-1.00$ and $\mathrm{KL}\cdot e^{\lambda}$ converges to
#   $p_{k-1}/p_k$ (1.16, 6.69 and 19.5 for first tokens of probability 0.46, 0.13 and 0.049). The
#   claim holds exactly: the soft pin converges to the prompt at rate $e^{-\lambda}$, and the constant is
#   the odds against the pinned token, so an unlikely prompt needs a larger $\lambda$ (about
#   $\log\frac{1-p}{p} + \log\frac1\varepsilon$ for a KL of $\varepsilon$).
# - *SmolLM2, one pin* (`" the"` after "Once upon a time,", $p = 0.161$ by `lm.score`): the IS estimate
#   $\log\hat p = -1.70 \pm 0.09$ is within 1.5 se of the exact $-1.83$, and the estimated KL curve
#   follows the exact one, from 1.70 nats (exact 1.83) at $\lambda = 0$ to $1.5\cdot10^{-3}$ (exact
#   $1.7\cdot10^{-3}$) at $\lambda = 8$, with fitted slope $-0.97$. The pin reaches KL < 0.01 nats at $\lambda \approx 6.3$.
# - *SmolLM2, two pins* (`" the city"`, $p = 0.0098$): 512 prior samples hold only a handful of
#   hits, so $\log \hat p_2 = -5.1 \pm 0.6$ (exact $-4.6$) and the whole curve is shifted by that error.
#   Its fitted slope, $-0.89$, is *not* $-1$ over $\lambda \in [2, 8]$, and that is the formula, not
#   noise: with two pins the $e^{-2\lambda}$ term (neither token matches, odds $p_0/p_2 \approx 85$)
#   dominates the $e^{-\lambda}$ term (odds $p_1/p_2 \approx 15$) until $\lambda \approx \log(p_0/p_1) \approx 1.7$,
#   and still bends the curve for a few units of $\lambda$ after that. The asymptotic rate is $e^{-\lambda}$
#   for any number of pins, but it takes longer to set in.
# - *Where the claim needs care.* "KL$(\pi_\lambda\,\|\,$prompt$)$ → 0" is false as written: that
#   direction is $+\infty$ for every finite $\lambda$, because $\pi_\lambda$ keeps mass
#   $\mathrm{TV} \approx \frac{1-p}{p}e^{-\lambda}$ on texts that break the pin. The convergence is in the
#   other KL direction and in total variation, both at rate $e^{-\lambda}$.
