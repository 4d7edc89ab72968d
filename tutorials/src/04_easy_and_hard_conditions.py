# %% [markdown]
# # 4. Easy and hard conditions
#
# **Claim.** The cost of conditioning by sampling is set by the rarity of the condition. For a
# hard condition $C$ and importance sampling with the LM itself as proposal, every weight is $0$ or
# $1$, so the effective sample size is the number of hits:
#
# $$\mathrm{ESS}/N \approx p = \pi(C),$$
#
# and a condition of probability $p$ costs about $1/p$ samples per usable one. Two things change the
# rate, not just the constant:
#
# - **SMC**, when the condition can be judged on prefixes (prefix-closed, like pinned tokens):
#   resampling after each token turns a product of per-token probabilities into a sum of per-token
#   costs; with a **token mask** the proposal never leaves the condition at all.
# - **A trained guide** (SVI): a proposal close to the posterior, importance-corrected.
#
# Conditions that can only be judged at the end and that the LM almost never meets stay hard for all
# of them. The factorisation condition ("the text begins with the prime factorisation of $N$") is
# the example: found for small $N$, not for large $N$.
#
# Section 5 puts numbers on the seed's sentence, "fine-tuning works for conditions not too rare under
# π (or a pre-conditioned π, via prompts)": six samplers on pins from $p = 10^{-1}$ to $2.6\cdot10^{-9}$
# (toy) and at $p = 5.5\cdot10^{-7}$ (SmolLM2), and at which $p$ each one stops working.

# %%
import contextlib
import io
import math
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message=".*k-hat.*")
warnings.filterwarnings("ignore", message=".*path degeneracy.*")

import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch

import ppl_lm
from ppl_lm import rewards

%matplotlib inline
SMOKE = ppl_lm.notebook.setup()  # one torch thread (PPL_LM_THREADS), smoke mode (PPL_LM_SMOKE=1)
LM_NAME = "tiny LM" if SMOKE else "SmolLM2"


class PinMask(ppl_lm.TokenMask):
    """Token mask of pinned positions: at position i only token pins[i] is allowed."""

    def __init__(self, lm, pins):
        super().__init__(lm)
        self.pins = dict(pins)

    def allowed(self, prefix):
        B, t = prefix.shape
        a = torch.ones(B, self.lm.vocab_size, dtype=torch.bool)
        if t in self.pins:
            a[:] = False
            a[:, self.pins[t]] = True
        return a


def pinned(lm, prompt, pins, T, as_mask=False):
    def model(*_):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        if as_mask:
            ppl_lm.token_constraint("pin", x, PinMask(lm, pins))
        else:
            ppl_lm.pin("pin", x, pins, lam=None)  # hard and prefix-closed
        return x

    return model


def ess(post):
    """Effective sample size: Kish's for IS; for SMC its genealogy-based n_eff (after resampling,
    the Kish ESS of the final weights overstates how many independent draws the particles are worth)."""
    return getattr(post.info, "n_eff_genealogy", post.ess)


def plot_ess(ax, p, e, floor, marker, label, **kw):
    """ESS/N against p; runs that found nothing (ESS 0) are drawn hollow on the floor."""
    p, e = np.asarray(p, float), np.asarray(e, float)
    found = e > 0
    line = ax.loglog(p[found], e[found], marker, label=label, **kw)[0]
    if (~found).any():
        ax.loglog(p[~found], np.full((~found).sum(), floor), marker, mfc="none", color=line.get_color(), **kw)


def run(model, method, *args, **opts):
    """A backend run that reports ESS 0 instead of failing when no sample meets the condition."""
    t0 = time.perf_counter()
    try:
        post = ppl_lm.infer(model, *args, method=method, progress=False, **opts)
    except ValueError as err:  # SVI too stops early, with an error, when no draw meets the condition
        if not any(s in str(err) for s in ("every weight is zero", "died", "satisfies", "no draw satisfied")):
            raise
        return None, time.perf_counter() - t0
    return post, time.perf_counter() - t0


# %% [markdown]
# ## 1. Exact rarity on a toy LM
#
# A Markov LM over `a b c d` (+ EOS) with up to $T = 6$ tokens (5461 sequences, so everything is
# exact). The conditions pin the first $k = 1 \dots 6$ tokens to a fixed string: each extra pin makes
# the condition rarer. For each we measure ESS/N of
#
# - IS with the prior as proposal ($N$ = 2000),
# - SMC on the hard pins ($N$ = 200 particles),
# - SMC with the pins as a token mask ($N$ = 200),
# - IS with a guide trained by SVI (`method="svi"`, 150 steps of 16 draws) as the proposal, for a
#   few of the conditions; the guide is trained either on the hard condition itself (relaxed to a
#   finite penalty while training) or on the soft pin with $\lambda = 3$ of notebook 3, a shaped
#   reward that gives credit per matching token.
#
# For IS the ESS is Kish's, $(\sum w)^2/\sum w^2$; for SMC it is the genealogy-based `n_eff` of the
# backend (after resampling, many final particles are copies, and the Kish ESS of the final
# weights would overstate how many independent draws they are worth).

# %%
toy = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)
T_toy, target = 6, "cabdca"
y_toy = toy.encode(target)
N_is, N_smc = (1000, 100) if SMOKE else (2000, 200)
ks = [1, 2, 4, 6] if SMOKE else list(range(1, T_toy + 1))
# (k, what the guide is trained on): the hard condition itself (relaxed to a -10 penalty while
# training), or the soft pin with λ = 3 (a shaped reward: one unit per matching token).
svi_cases = [(2, "hard"), (4, "soft")] if SMOKE else [(2, "hard"), (3, "hard"), (4, "soft"), (6, "soft")]
svi_steps = 100 if SMOKE else 150


def soft_pinned(lm, prompt, pins, T, lam=3.0):
    def model(*_):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.pin("pin", x, pins, lam=lam)
        return x

    return model


toy_rows = []
for k in ks:
    pins = {i: y_toy[i] for i in range(k)}
    m = pinned(toy, [], pins, T_toy)
    p = math.exp(ppl_lm.infer(m, method="exact").log_evidence)
    is_post, _ = run(m, "importance", num_samples=N_is, seed=0)
    smc_post, _ = run(m, "smc", num_particles=N_smc, seed=0)
    mask_post, _ = run(pinned(toy, [], pins, T_toy, as_mask=True), "smc", num_particles=N_smc, seed=0)
    row = dict(k=k, p=p,
               is_=0.0 if is_post is None else is_post.ess / N_is,
               smc=0.0 if smc_post is None else ess(smc_post) / N_smc,
               mask=0.0 if mask_post is None else ess(mask_post) / N_smc,
               lz_mask=None if mask_post is None else mask_post.log_evidence, svi={},
               lz_smc=None if smc_post is None else (smc_post.log_evidence, smc_post.log_evidence_se))
    for kk, how in svi_cases:
        if kk != k:
            continue
        train = m if how == "hard" else soft_pinned(toy, [], pins, T_toy)
        trained, _ = run(train, "svi", guide="full", num_steps=svi_steps, num_particles=16, lr=0.1,
                         num_samples=16, seed=0)
        if trained is None:  # none of the guide's draws met the condition after training
            row["svi"][how] = (0.0, None)
            continue
        # The trained guide as the proposal for the hard condition (importance-corrected).
        g_post, _ = run(m, "importance", guide=trained.guide, num_samples=N_is, seed=1)
        row["svi"][how] = (0.0, None) if g_post is None else (
            g_post.ess / N_is, (g_post.log_evidence, g_post.log_evidence_se))
    toy_rows.append(row)
    lz_s = "" if row["lz_smc"] is None else f" (log Ẑ {row['lz_smc'][0]:.2f} ± {row['lz_smc'][1]:.2f} vs {math.log(p):.2f})"
    print(f"k={k}  p={p:.2e}  ESS/N: IS {row['is_']:.4f}  SMC {row['smc']:.3f}{lz_s}  SMC+mask {row['mask']:.3f}"
          + "".join(f"  guide({how}) {v[0]:.3f}" for how, v in row["svi"].items()))

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.2))
P = np.array([r["p"] for r in toy_rows])
floor = 1e-5
ax.loglog(P, P, "k--", lw=1, label="ESS/N = p")
plot_ess(ax, P, [r["is_"] for r in toy_rows], floor, "o", f"IS, prior proposal (N={N_is})")
plot_ess(ax, P, [r["smc"] for r in toy_rows], floor, "s", f"SMC, hard pins (N={N_smc}), n_eff")
plot_ess(ax, P, [r["mask"] for r in toy_rows], floor, "^", f"SMC, token mask (N={N_smc}), n_eff")
for how, mk in (("hard", "D"), ("soft", "P")):
    sv = [(r["p"], r["svi"][how][0]) for r in toy_rows if how in r["svi"]]
    if sv:
        plot_ess(ax, *zip(*sv), floor, mk,
                 f"IS, guide trained on the {'hard condition' if how == 'hard' else 'soft pin λ=3'}", ms=8)
ax.axhline(floor, color="grey", lw=0.5)
ax.text(P.min(), floor * 1.4, "hollow, on this line: none found (ESS 0)", fontsize=7, color="grey")
ax.set_xlabel("p = π(condition), exact")
ax.set_ylabel("ESS / N")
ax.set_title("toy LM: pinning the first k tokens, k = 1..6")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
for r in toy_rows:
    # Prior-proposal IS on a hard condition: ESS = number of hits ~ Binomial(N, p).
    assert abs(r["is_"] - r["p"]) < 4 * math.sqrt(r["p"] * (1 - r["p"]) / N_is) + 1.5 / N_is, r
    # A token mask that only allows the pinned tokens is the perfect proposal (it is prompting):
    # log Z is exact, with no Monte Carlo error at all.
    assert abs(r["lz_mask"] - math.log(r["p"])) < 1e-4, r
    # SMC on the hard pins estimates log p even where IS finds nothing (within its error).
    if r["lz_smc"] is not None:
        assert abs(r["lz_smc"][0] - math.log(r["p"])) < max(4 * (r["lz_smc"][1] or 0.0), 0.3), r
    for how, (ess_n, lz) in r["svi"].items():
        if lz is not None:  # guide-proposal IS is unbiased for Z, and here a far better proposal
            assert abs(lz[0] - math.log(r["p"])) < 4 * lz[1] + 0.1, (r, how)
            assert ess_n > 10 * r["p"], (r, how)

# %% [markdown]
# ## 2. On the real LM
#
# Pins of the first $k$ tokens of the greedy continuation of a prompt: their probability $p$ is
# known exactly from `lm.score` (the probability of the pinned prefix), so ESS/N can be checked
# against it on the real model; SMC runs on the hard pins and with the pins as a token mask. Then keyword conditions ("contains the word $w$", not prefix-closed), whose $p$ is
# estimated by the hit rate.

# %%
if SMOKE:
    lm = ppl_lm.tiny_transformer(6, eos_id=0, seed=1, scale=0.15)
    prompt, n_pins = [1, 2], 4
    N_lm, N_smc_lm, T_kw, N_kw = 256, 64, 6, 128
    words = ["a", "ab", "abc"]
else:
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # hide the GGUF conversion progress bars
        lm = ppl_lm.load_lm()
    print(f"loaded SmolLM2 in {time.perf_counter() - t0:.0f} s")
    prompt, n_pins = "Once upon a time,", 5
    N_lm, N_smc_lm, T_kw, N_kw = 512, 128, 12, 256
    words = [" the", " king", " dragon"]
# The pinned string is the greedy continuation: every token is the likeliest, and still the
# probability of the whole prefix falls fast.
with torch.no_grad():
    st, y = lm.start(ppl_lm.tokens.as_prompt_tensor(prompt, lm), 1), []
    for _ in range(n_pins):
        lp = st.logprobs[0].clone()
        lp[lm.eos_id] = -math.inf
        y.append(int(lp.argmax()))
        st = lm.extend(st, torch.tensor([y[-1]]))
lm_rows = []
for k in range(1, len(y) + 1):
    pins = {i: y[i] for i in range(k)}
    p = math.exp(lm.score(prompt, torch.tensor([y[:k]])).item())
    m = pinned(lm, prompt, pins, len(y))
    is_post, t_is = run(m, "importance", num_samples=N_lm, seed=0)
    smc_post, t_smc = run(m, "smc", num_particles=N_smc_lm, seed=0)
    mask_post, t_mask = run(pinned(lm, prompt, pins, len(y), as_mask=True), "smc", num_particles=N_smc_lm, seed=0)
    row = dict(k=k, p=p, is_=0.0 if is_post is None else is_post.ess / N_lm,
               smc=0.0 if smc_post is None else ess(smc_post) / N_smc_lm,
               mask=0.0 if mask_post is None else ess(mask_post) / N_smc_lm,
               lz_smc=None if smc_post is None else (smc_post.log_evidence, smc_post.log_evidence_se),
               lz_mask=None if mask_post is None else mask_post.log_evidence,
               t_is=t_is, t_smc=t_smc, t_mask=t_mask)
    lm_rows.append(row)
    print(f"pin {lm.decode(y[:k])!r:26} p={p:.2e}  ESS/N: IS {row['is_']:.4f} ({t_is:.0f} s)  "
          f"SMC {row['smc']:.3f} ({t_smc:.0f} s)  SMC+mask {row['mask']:.3f} ({t_mask:.0f} s)")


def keyword(lm, prompt, w, T):
    def model(*_):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.constraint("kw", rewards.contains(lm, x, w))
        return x

    return model


kw_rows = []
for w in words:
    post, dt = run(keyword(lm, prompt, w, T_kw), "importance", num_samples=N_kw, seed=0)
    hits = 0 if post is None else post.info.num_nonzero
    kw_rows.append(dict(w=w, p=hits / N_kw, ess=0.0 if post is None else post.ess / N_kw, hits=hits, t=dt))
    print(f"contains {w!r:10} within {T_kw} tokens: {hits}/{N_kw} hits, ESS/N = {kw_rows[-1]['ess']:.3f} ({dt:.0f} s)")

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.2))
P = np.array([r["p"] for r in lm_rows])
lo = min(P.min(), 1 / N_lm) / 2
grid = np.array([lo, 1.0])
ax.loglog(grid, grid, "k--", lw=1, label="ESS/N = p")
plot_ess(ax, P, [r["is_"] for r in lm_rows], lo, "o", f"IS, pins (N={N_lm}), exact p")
plot_ess(ax, P, [r["smc"] for r in lm_rows], lo, "s", f"SMC, hard pins (N={N_smc_lm}), n_eff")
plot_ess(ax, P, [r["mask"] for r in lm_rows], lo, "^", f"SMC, token mask (N={N_smc_lm}), n_eff")
kp = [r for r in kw_rows if r["hits"] > 0]
ax.loglog([r["p"] for r in kp], [r["ess"] for r in kp], "v", label=f"IS, keywords (N={N_kw}), p = hit rate")
for r in lm_rows:
    ax.annotate(f"k={r['k']}", (r["p"], 1.0), fontsize=7, xytext=(0, 6), textcoords="offset points", ha="center")
ax.axhline(lo, color="grey", lw=0.5)
ax.set_xlabel("p = π(condition)")
ax.set_ylabel("ESS / N")
ax.set_title(f"{LM_NAME}: pins of the greedy continuation {lm.decode(y)!r}", fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()

# %%
for r in lm_rows:
    assert abs(r["is_"] - r["p"]) < 4 * math.sqrt(r["p"] * (1 - r["p"]) / N_lm) + 1.5 / N_lm, r
    if r["lz_smc"] is not None:
        lz, se = r["lz_smc"]
        # SMC's log Z of a pin condition estimates log p (exact here): within 4 se, or 0.3 nats
        # where the genealogy-based se is unavailable or degenerate.
        assert abs(lz - math.log(r["p"])) < max(4 * (se or 0.0), 0.3), r
    assert r["lz_mask"] is not None and abs(r["lz_mask"] - math.log(r["p"])) < 1e-3 * max(1, -math.log(r["p"])), r

# %% [markdown]
# ## 3. The hard case: factorisation
#
# `models/factorisation.py`: the prompt is "The prime factorisation of $N$ is" and the condition is
# that the continuation begins with primes whose product is $N$ (checked with sympy). It is not
# prefix-closed as checked, so SMC cannot prune; we use importance sampling with the prior and
# count the hits.

# %%
from ppl_lm.models import factorisation

if SMOKE:
    Ns, N_fac, T_fac = [6, 2021], 32, 6
    lm_fac = ppl_lm.tiny_char_transformer(seed=0)
else:
    Ns, N_fac, T_fac = [4, 6, 10, 15, 21, 35, 2021, 1000003 * 1000033], 128, 10
    lm_fac = lm
model_fac = factorisation.build(lm_fac, max_new_tokens=T_fac)
fac_rows = []
for n in Ns:
    post, dt = run(model_fac, "importance", n, num_samples=N_fac, seed=0)
    hits = 0 if post is None else post.info.num_nonzero
    example = "" if post is None else post.texts[int(torch.argmax(post.log_weights))]
    fac_rows.append(dict(N=n, hits=hits, p=hits / N_fac, t=dt, example=example, post=post,
                         lz=None if post is None else post.log_evidence))
    print(f"N={n:<14} hits {hits:3d}/{N_fac}  ({dt:.0f} s)  " + (f"e.g. {example!r}" if hits else ""))
x4, _ = lm_fac.sample(factorisation.prompt(Ns[-1]), 4, T_fac, generator=torch.Generator().manual_seed(0))
print(f"what the LM writes after {factorisation.prompt(Ns[-1])!r}:")
for t in [lm_fac.decode(r) for r in x4.tolist()]:
    print("    ", repr(t))

# %% [markdown]
# Why the large $N$ are out of reach, in numbers: the probability the LM gives to the correct
# factorisation itself (`lm.score` of its tokens after the prompt; two spellings, the condition accepts
# both and more), and the number of hits that makes in $N$ = 128 draws.

# %%
import sympy


def spelled(n, sep):
    return " " + sep.join(str(q) for q, e in sorted(sympy.factorint(n).items()) for _ in range(e))


fac_seps = (" * ",) if SMOKE else (" * ", " × ")
for r in fac_rows:
    r["p_correct"] = {s: math.exp(lm_fac.score(factorisation.prompt(r["N"]), torch.tensor([lm_fac.encode(spelled(r["N"], s))])).item())
                      for s in fac_seps}
    print(f"N={r['N']:<14} " + ", ".join(f"p({spelled(r['N'], s)!r}) = {p:.1e}" for s, p in r["p_correct"].items())
          + f"  -> expected hits in {N_fac}: {N_fac * sum(r['p_correct'].values()):.2g} (seen {r['hits']})")

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.2))
ax.bar([str(r["N"]) for r in fac_rows], [r["p"] for r in fac_rows], color="C3")
for i, r in enumerate(fac_rows):
    ax.text(i, r["p"], f"{r['hits']}/{N_fac}", ha="center", va="bottom", fontsize=8)
ax.set_ylabel("hit rate (prior IS)")
ax.set_xlabel("N")
ax.set_title(f"{LM_NAME}: 'begins with the prime factorisation of N'")
plt.setp(ax.get_xticklabels(), rotation=20)
fig.tight_layout()

# %%
# Every weighted sample of a run with hits begins with a correct factorisation (the model's
# condition also rejects a product that runs on into more arithmetic, " 2 * 3 + 1", so it is
# at least as strict as rewards.factorisation alone).
for r in fac_rows:
    if r["post"] is not None:
        ok = rewards.factorisation(lm_fac, r["post"].samples, r["N"])
        assert bool(ok[r["post"].weights > 0].all()) and int(ok.sum()) >= r["hits"], r["N"]

# %% [markdown]
# ## 4. A hard condition made easy by the right mask: a valid chess game
#
# The seed's third example: "text from the model that contains a valid chess game". In
# `models/chess_game.py` the LM continues the opening "1. e4 e5 2. Nf3 Nc6 3." and the condition is
# that the game goes on for at least `min_moves` legal half-moves (python-chess judges). A small
# LM soon writes an illegal move, so each extra half-move makes the condition rarer, and the same
# condition can be handed to SMC in three ways:
#
# - **deferred** (`mode="hard"`): the count is checked on the finished text only; SMC cannot prune.
# - **prefix** (`mode="prefix"`): a grammar mask of SAN-shaped moves, and the legality of each move
#   as a prefix-closed constraint: a particle dies as soon as it completes an illegal move.
# - **legal mask** (`mode="legal_mask"`, `rewards.chess_mask`): each particle carries its board, and
#   the proposal allows only tokens that keep the text on a legal path. No particle can die; the
#   weight is the LM's mass on the legal tokens. It asks the moves to be written exactly as
#   python-chess writes them (move numbers, "x", "+"), which the lenient reading of the other two
#   does not, so its $Z$ is at most theirs.
#
# SMC with $N$ = 32 particles, two seeds per cell; a run is *dead* when every particle died (no
# estimate at all). Every game the legal mask returns is then replayed by python-chess. In all
# three modes, once `min_moves` half-moves are made, whitespace and then anything may follow (the
# condition asks for a game of that length, not for what comes after it), so python-chess's verdict
# on the whole text (`chess_game.check`, which `ppl-lm run chess_game` prints under each sample)
# may go on past them.

# %%
from ppl_lm.models import chess_game

if SMOKE:  # a random character-level LM: a half-move with its number is up to 8 characters
    lm_chess, chess_moves, N_chess, chess_seeds, T_base, T_move = ppl_lm.tiny_char_transformer(seed=0), [2, 4], 8, [0, 1], 10, 8
else:  # SmolLM2's tokens: about 3-4 per half-move with its number
    lm_chess, chess_moves, N_chess, chess_seeds, T_base, T_move = lm, [4, 8], 32, [0, 1], 12, 5
chess_modes = {"deferred": "hard", "prefix": "prefix", "legal mask": "legal_mask"}
opening = chess_game.context[chess_game.context.index("1."):]
chess_rows, chess_games = [], []
# The table shows what SMC's warnings would say (few effective draws, collapsed genealogies).
warnings.filterwarnings("ignore", message=".*(path_degeneracy|too_few_draws).*")
t_chess = time.perf_counter()
for k in chess_moves:
    for label, mode in chess_modes.items():
        model = chess_game.build(lm_chess, min_moves=k, mode=mode, max_new_tokens=T_base + T_move * k)
        for seed in chess_seeds:
            post, dt = run(model, "smc", chess_game.context, num_particles=N_chess, seed=seed)
            chess_rows.append(dict(k=k, mode=label, seed=seed, t=dt, post=post,
                                   lz=None if post is None else post.log_evidence,
                                   se=None if post is None else post.log_evidence_se,
                                   kish=0.0 if post is None else post.ess,
                                   n_eff=0.0 if post is None else ess(post)))
            if post is not None and mode == "legal_mask":
                chess_games.append((k, seed, post.texts[int(torch.argmax(post.log_weights))]))
t_chess = time.perf_counter() - t_chess
print(f"{LM_NAME}, SMC N={N_chess}, seeds {chess_seeds}; {t_chess:.0f} s for the section's {len(chess_rows)} runs")
print(f"{'min_moves':>9}  {'condition':10}  {'dead runs':>9}  {'Kish ESS':>8}  {'n_eff':>5}  "
      f"{'log Z ± se (per seed)':34}  wall time")
for k in chess_moves:
    for label in chess_modes:
        rs = [r for r in chess_rows if r["k"] == k and r["mode"] == label]
        lz = ", ".join("dead" if r["lz"] is None else f"{r['lz']:.1f} ± {r['se'] or math.nan:.1f}" for r in rs)
        print(f"{k:>9}  {label:10}  {sum(r['lz'] is None for r in rs):>5} / {len(rs)}  "
              f"{np.mean([r['kish'] for r in rs]):>8.1f}  {np.mean([r['n_eff'] for r in rs]):>5.1f}  {lz:34}  "
              + ", ".join(f"{r['t']:.0f} s" for r in rs))

# %%
import chess


def replay(text, n):
    """python-chess replays the opening and the next ``n`` half-moves of ``opening + text`` (move
    numbers skipped); returns the board, or raises ValueError at an illegal move."""
    board = chess.Board()
    items = [w for w in (opening + text).split() if not w.rstrip(".").isdigit()]
    for item in items[: 4 + n]:
        if board.is_game_over():  # a game python-chess ends (mate, fivefold repetition) before n
            break
        board.push_san(item)
    assert len(board.move_stack) == 4 + n or board.is_game_over(), (text, board.move_stack)
    return board


for k, seed, text in chess_games:
    print(f"min_moves {k}, seed {seed}: {opening + text!r}\n    python-chess: {chess_game.check(text)}")
k, seed, text = chess_games[-1]
print(f"\nthe position after min_moves {k} half-moves of the last game:\n{replay(text, k).unicode(empty_square='·')}")

# %%
# The legal mask: no run dies, and every particle it returns (not only the top ones) is a legal
# game of at least min_moves half-moves (or one python-chess declares over): a real replay.
for r in chess_rows:
    if r["mode"] == "legal mask":
        assert r["post"] is not None and torch.isfinite(r["post"].log_weights).all(), r
        for text in r["post"].texts:
            replay(text, r["k"])
        assert all(chess_game.check(t).startswith("legal") for t in r["post"].texts)

# %% [markdown]
# ## 5. The rare-event table: which sampler survives which p
#
# Sections 1 and 2 measured *whether* a method finds the condition. The table of
# `benchmarks/rarity.py` (same code, imported below) asks how well, down to $p = 10^{-8}$: hard pins
# of the first $k$ tokens, each pinned token chosen so that $p$ falls about one decade per pin, and
# six samplers with the same number of draws $N$:
#
# | column | proposal | trained on |
# |---|---|---|
# | `is` | the prior | – |
# | `smc` | the prior, the pin prunes prefixes | – |
# | `smc_prompt` | `ppl_lm.prompted(lm, text)`: the pinned text read once before the prompt | – |
# | `smc_twist` | π·ψ, a twist learned by CTL (`ppl_lm.learn_twist`) | the hard pin, by SMC |
# | `guide_is` | an SVI guide (reverse KL), importance-corrected | the soft pin, λ = 5 per matching token |
# | `smc_guide` | the same kind of guide as SMC's `proposal=` | the soft pin, forward KL on a defensive prior/guide mixture (taught by importance sampling, not by SMC) |
#
# Every column estimates the same $\log Z = \log p$; the cells say how far off it is (the RMS of
# $\log\hat Z - \log p$ over seeds), its ESS/N (Kish's for IS, the genealogy `n_eff` for SMC) and the
# time of one run against plain sampling of the same $N \times T$ tokens (CPU time: the wall time on
# a shared machine mostly measures the neighbours). The goal at $p \approx 10^{-6}$: RMS error
# ≤ 0.1 nats, ESS/N ≥ 0.1, ≤ 10× plain sampling. A Markov LM forgets its prompt after one token, so
# on the toy a prompted proposal would be the prior: that column is SmolLM2's only. Training is once
# per condition and listed apart.

# %%
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "rarity", pathlib.Path(ppl_lm.__file__).resolve().parents[1] / "benchmarks" / "rarity.py")
rarity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rarity)

COLS = rarity.METHODS
toy8 = ppl_lm.MarkovLM.random(8, eos_id=0, seed=11, scale=1.0)
rare_ks = [1, 3, 6] if SMOKE else list(range(1, 9))
rare_path = rarity.decade_path(toy8, [1], max(rare_ks))
rare_cfg = dict(toy=True, guide="full", twist_steps=10 if SMOKE else 100, twist_particles=64,
                svi_steps=20 if SMOKE else 300, svi_particles=64, lam=5.0, seed=0)
N_rare, seeds_rare = (200, 2) if SMOKE else (1000, 5)
t0 = time.perf_counter()
rare_toy = rarity.table(toy8, [1], 10, rare_path, rare_ks, [c for c in COLS if c != "smc_prompt"], N_rare, seeds_rare,
                        rare_cfg, plain_repeats=3, check_exact=SMOKE, log=lambda *a: None)
print(f"toy table: {time.perf_counter() - t0:.0f} s, N = {N_rare}, {seeds_rare} seeds per cell")

if SMOKE:  # the tiny transformer of section 2; its "prompted proposal" reads the pinned tokens first
    rare_lm, rare_prompt, rare_T = lm, prompt, 6
    rare_lm_path = rarity.decade_path(lm, prompt, 3)
    rare_lm_ks, rare_lm_cfg = [3], dict(toy=False, guide="full", twist_steps=2, twist_particles=16, svi_steps=2,
                                       svi_particles=16, lam=5.0, seed=0, proposal_text=rare_lm_path)
    N_rare_lm, seeds_rare_lm = 16, 2
else:  # SmolLM2: the p ≈ 5.5e-7 pin of benchmarks/rarity.py (7 tokens of " there lived an old man who lived alone")
    rare_lm, rare_prompt, rare_T = lm, rarity.PROMPT, 8
    rare_lm_path = lm.encode(rarity.CONTINUATION)[:rare_T]
    rare_lm_ks, rare_lm_cfg = [7], dict(toy=False, guide="lora", twist_steps=30, twist_particles=32, svi_steps=30,
                                       svi_particles=16, lam=5.0, seed=0)
    N_rare_lm, seeds_rare_lm = 64, 2
t0 = time.perf_counter()
rare_real = rarity.table(rare_lm, rare_prompt, rare_T, rare_lm_path, rare_lm_ks, COLS, N_rare_lm, seeds_rare_lm,
                         rare_lm_cfg, plain_repeats=2, log=lambda *a: None)
print(f"{LM_NAME} row: {time.perf_counter() - t0:.0f} s, N = {N_rare_lm}, {seeds_rare_lm} seeds per cell")


def show_table(rows, title):
    print(title)
    print(f"{'p':>8}  " + "  ".join(f"{c:>21}" for c in COLS))
    for r in rows:
        cells = []
        for c in COLS:
            s = r["cols"].get(c)
            if s is None or "runs" not in s:
                cells.append(f"{'–':>21}")
            elif "err_rms" not in s:
                cells.append(f"{'dead ' + str(s['dead']) + '/' + str(s['runs']):>21}")
            else:
                cells.append(f"{s['err_rms']:5.2f} {s['ess_over_n']:5.2f} {s['cost_cpu']:5.1f}x"
                             + ("*" if rarity.goal(dict(s, cost_wall=s["cost_cpu"])) else " ") + " ")
        print(f"{r['p']:8.1e}  " + "  ".join(cells))
    print("cell: RMS log-Z error (nats), ESS/N, CPU time / plain sampling; * = meets the goal's three bounds\n")


show_table(rare_toy, f"toy MarkovLM (vocab 8, 10 tokens), N = {N_rare}")
show_table(rare_real, f"{LM_NAME}, N = {N_rare_lm}")
for r in rare_toy + rare_real:
    train = ", ".join(f"{c} {s['train_s']:.0f} s" for c, s in r["cols"].items() if s.get("train_s"))
    print(f"p = {r['p']:.1e}: training (wall) {train}")

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.2))
rare_floor = 1e-4
for i, c in enumerate(COLS):
    for rows, mk, ms, label in ((rare_toy, "o-", 4, c), (rare_real, "*", 12, None)):
        pts = np.array([(r["p"], r["cols"][c]["ess_over_n"]) for r in rows if "runs" in r["cols"].get(c, {})])
        if len(pts):
            found = pts[:, 1] > 0  # dead everywhere (ESS 0): hollow, on the floor
            ax.loglog(pts[found, 0], pts[found, 1], mk, color=f"C{i}", ms=ms, label=label)
            ax.loglog(pts[~found, 0], np.full((~found).sum(), rare_floor), mk[0], color=f"C{i}", ms=ms, mfc="none")
ax.axhline(rare_floor, color="grey", lw=0.5)
ax.axhline(0.1, color="k", ls=":", lw=1)
ax.set_xlabel("p = π(condition), exact")
ax.set_ylabel("ESS / N (mean over seeds)")
ax.set_title(f"toy pins (lines) and the {LM_NAME} pin (stars); dotted: the goal's ESS/N", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()

# %%
# Prior IS on a hard condition: ESS = number of hits ~ Binomial(N, p), on every row and seed.
for rows, n in ((rare_toy, N_rare), (rare_real, N_rare_lm)):
    for r in rows:
        s = r["cols"]["is"]
        bound = 4 * math.sqrt(r["p"] * (1 - r["p"]) / n / s["runs"]) + 1.5 / n
        assert abs(s["ess_over_n"] - r["p"]) < bound, (r["p"], s["ess_over_n"], bound)


def works(s):
    """A column works at a p if no seed died, the RMS log-Z error is <= 0.1 nats and ESS/N >= 0.1."""
    return s is not None and "err_rms" in s and s["dead"] == 0 and s["err_rms"] <= 0.1 and s["ess_over_n"] >= 0.1


for name, rows in (("toy", rare_toy), (LM_NAME, rare_real)):
    for c in COLS:
        ok = [r["p"] for r in rows if works(r["cols"].get(c))]
        bad = [r["p"] for r in rows if c in r["cols"] and "runs" in r["cols"][c] and not works(r["cols"][c])]
        if ok or bad:
            print(f"{name:8} {c:>10}: works down to p = {min(ok):.1e}" if ok else f"{name:8} {c:>10}: works at no p",
                  f"| fails at p = {max(bad):.1e}" if bad else "| fails nowhere in the table")

# %% [markdown]
# ## What the numbers say

# %%
print("toy: ESS/N of prior IS vs exact p:",
      ", ".join(f"k={r['k']}: {r['is_']:.4f} vs {r['p']:.4f}" for r in toy_rows))
print("toy: SMC ESS/N on hard pins:", ", ".join(f"{r['smc']:.2f}" for r in toy_rows),
      "| SMC with the token mask: all", f"{min(r['mask'] for r in toy_rows):.2f}")
print("toy: guide-proposal ESS/N:", ", ".join(f"k={r['k']} ({how}): {v[0]:.3f} (p={r['p']:.1e})"
                                             for r in toy_rows for how, v in r["svi"].items()))
print(f"{LM_NAME} pins: " + ", ".join(f"p={r['p']:.1e} → IS {r['is_']:.3f} / SMC {r['smc']:.2f} / mask {r['mask']:.2f}"
                                     for r in lm_rows))
print(f"{LM_NAME} keywords: " + ", ".join(f"{r['w']!r} {r['hits']}/{N_kw}" for r in kw_rows))
print(f"{LM_NAME} factorisation hits: " + ", ".join(f"N={r['N']}: {r['hits']}/{N_fac}" for r in fac_rows))
for k in chess_moves:
    print(f"{LM_NAME} chess, min_moves {k}: " + "; ".join(
        f"{label} {sum(r['lz'] is None for r in rs)}/{len(rs)} dead, n_eff {np.mean([r['n_eff'] for r in rs]):.1f}"
        for label in chess_modes for rs in [[r for r in chess_rows if r["k"] == k and r["mode"] == label]]))
for name, rows in (("toy", rare_toy), (LM_NAME, rare_real)):
    r = rarity.goal_row(rows)
    print(f"rare-event table, {name} pin at p = {r['p']:.1e}: " + "; ".join(
        f"{c} dead {s['runs']}/{s['runs']}" if "err_rms" not in s else
        f"{c} RMS {s['err_rms']:.3f}, ESS/N {s['ess_over_n']:.2f}, {s['cost_cpu']:.1f}x CPU"
        for c, s in r["cols"].items() if "runs" in s))

# %% [markdown]
# **Reading the committed run (SmolLM2).** (1958 s on a 2-core CPU shared with other jobs, load 10–20;
# 1158 s of it section 5.)
#
# - *ESS/N ≈ p holds for prior IS.* On the toy, 0.092 vs $p$ = 0.089 ($k=1$) and 0.0025 vs 0.0031
#   ($k=2$); beyond that $Np < 1$ and IS finds nothing. On SmolLM2, with $p$ exact from `lm.score`:
#   0.148 vs 0.161, 0.008 vs 0.010, then no hit at $p = 4.7\cdot10^{-3}$ (2.4 hits expected in
#   $N = 512$; none happens with probability 0.09), $5\cdot10^{-4}$ and $3\cdot10^{-4}$. A condition of
#   probability $p$ costs $\approx 1/p$ samples per usable one, as claimed.
# - *SMC on the hard pins finds what IS cannot, but its information collapses.* It survives every
#   pin and its $\log \hat Z$ is within two of its standard errors of the exact $\log p$ (toy,
#   $k = 6$: $-16.2 \pm 0.8$ vs $-15.4$, where $1/p = 5\cdot10^{6}$ prior samples would be needed per
#   hit), though below it at
#   every $k \ge 2$, by 0.8 to 1.5 nats (the log of an unbiased $\hat Z$ from a collapsed genealogy is
#   biased low). After each rare pin only a few particles survive and resampling copies them: for
#   $k \ge 2$ the final particles descend from 2 initial ones on the toy (`n_eff`/N = 0.01) and from
#   6 on SmolLM2 (0.05). That is much better than IS at small $p$, not the "sum of per-token costs"
#   of the claim: the rate changes, the cost does not disappear.
# - *The token mask is prompting*, and it removes the cost entirely: ESS/N = 1 and $\log \hat Z$ equal
#   to the exact $\log p$ at every $k$, on the toy and on SmolLM2, because each particle proposes
#   only the pinned token and is weighted by its probability, the same for every particle.
# - *A trained guide helps where training sees the condition.* Trained on the hard condition, it
#   gets nothing at $p = 3\cdot10^{-3}$ and $1.2\cdot10^{-4}$: SVI stops after 20 steps (320 draws) in
#   which no draw met the pins (at $p = 3\cdot10^{-3}$ that happens with probability 0.37), with an
#   error that says so, instead of training on a penalty that is the same for every draw (a zero
#   leave-one-out gradient). (An earlier run, before SVI stopped early, saw hits at
#   $p = 3\cdot10^{-3}$ and reached ESS/N = 0.93 there.) Trained on the *shaped* soft pin
#   ($\lambda = 3$, credit per matching token) it reaches ESS/N = 0.038 at $p = 2\cdot10^{-5}$
#   (1800× $p$), but still nothing at $p = 2\cdot10^{-7}$ in 150 steps.
# - *Keywords and factorisation stay hard.* "Contains ' the'" within 12 tokens is common (149 of 256
#   draws, ESS/N 0.58); "contains ' king'" gets one hit in 256 draws and "contains ' dragon'" none.
#   SmolLM2 writes a valid prime factorisation of $N$ = 4, 6, 10, 15 in 6% to 28% of draws, and of
#   $N$ = 21, 35, 2021 and $1000003 \times 1000033$ in none of 128: these conditions are judged only
#   at the end, the LM almost never meets them, and no sampler here can make an LM that cannot
#   factor produce factorisations; it can only find the ones it would write.
# - *Why, in numbers* (`lm.score` of the correct factorisation after the prompt, two spellings):
#   " 3 * 5" has $p$ = 0.055 (8 hits expected in 128, 15 seen), " 3 * 7" $9.2\cdot10^{-4}$ and
#   " 5 * 7" $5.9\cdot10^{-4}$ (0.15 and 0.09 expected hits: 128 draws are simply too few, a few
#   thousand would find them), but " 43 * 47" for 2021 has $1.4\cdot10^{-8}$ (× has
#   $2.6\cdot10^{-9}$) and " 1000003 * 1000033" $6.0\cdot10^{-9}$: about $10^{8}$ prior draws per
#   hit. That is the bottom of section 5's toy table, where only learned proposals still work: the
#   twist, on a condition it can see on prefixes, and the guides, trained on a shaped reward (credit
#   per matching token). This one is judged at the end ("43" could still grow to "431"), so SMC and
#   CTL get no signal before the last token, and a prefix check ("the digits so far start a factor of
#   $N$") or a shaped reward (credit per correct digit) would need the factors. For 2021 the LM's own
#   probability of the answer, not the sampler, is the limit.
# - *A valid chess game is hard until legality is in the mask* (section 4, $N$ = 32, two seeds).
#   The deferred check died in all 4 runs (min_moves 4 and 8): no particle of 32 wrote 4 legal
#   half-moves. The prefix potential died in 1 of 2 runs at each min_moves, and its surviving runs
#   rest on 2 and 1 ancestors (`n_eff`; their Kish ESS of 31 and 32 only says the final weights
#   are even). The legal mask died in none of 4, with Kish ESS 20.5
#   and 28.5 of 32 and `n_eff` 4.5 and 3.0 (means of the seeds), and its seeds agree: $\log \hat Z$ =
#   $-8.7 \pm 0.6$ and $-8.8 \pm 0.5$ at min_moves 4, $-18.6 \pm 0.8$ and $-19.2 \pm 0.3$ at 8. The
#   prefix runs that survived say more ($-7.2$ and $-14.1$): their condition is looser (python-chess's
#   lenient reading takes "Bxd4" onto an empty square, a missing "+", any move number), so a larger
#   $Z$ is expected, but one ancestor is no estimate to a few nats (at $N$ = 64,
#   `benchmarks/RESULTS.md` §12 has them below). Time: 25 to 41 s per legal-mask run, as long as a
#   deferred run (17 to 36 s: it writes every token and dies at the end); the section took 336 s of
#   the notebook's 1958 s.
# - *The games are legal, and weak.* Every particle the mask returned replays legally in
#   python-chess for its first min_moves half-moves (asserted above, not only the games shown).
#   SmolLM2 shuffles its bishops (3. Bc4 Bd6 4. Bb5 b6 5. Bc4 Bc5 6. d4 d5) and then uses the free
#   tail: two games turn to prose ("Corrects! # SQL SELECT ...", "Why is this limited?"), one goes
#   on "7. Nf3 Nbdxc8" with a knight already on f3, one writes "d4 e5" after a blank line;
#   python-chess's verdicts above say so move by move. The mask makes the games legal, not good.
# - *The rare-event table (section 5): which sampler survives which $p$.* "Works" below means RMS
#   log-Z error ≤ 0.1 nats over the seeds and ESS/N ≥ 0.1 (the goal, without its cost bound).
#   On the toy ($N$ = 1000, 5 seeds): prior IS works at $p$ = 0.1 only (RMS 0.08), fails from 0.01
#   (RMS 0.31) and dies in every run from $5.2\cdot10^{-6}$ on; SMC never dies but its RMS is 0.12–0.27 nats at every $p \le 0.01$ (its
#   `n_eff`/N of 1.00 describes the posterior draws, not log Z); the learned twist (100 CTL steps,
#   9–12 s), the guide taught by reverse KL on the soft pin (300 steps, 6–10 s) and the
#   mixture-taught guide in SMC all work down to $2.6\cdot10^{-9}$ (RMS ≤ 0.02, ≤ 0.03 and ≤ 0.07;
#   ESS/N 0.92–0.98, 0.94 → 0.45 and 0.89 → 0.55). The toy LM samples a token in 0.3 µs, so its cost
#   column (2.4–13.4× plain sampling) is the samplers' bookkeeping.
# - *On SmolLM2 at $p = 5.5\cdot10^{-7}$* (7 pinned tokens of " there lived an old man who lived
#   alone", $N$ = 64, 2 seeds): prior IS dead in both runs; SMC RMS 1.06 with `n_eff`/N 0.01; SMC
#   with the prompted proposal (the sentence read once before the prompt) ESS/N 0.10 but RMS 1.40;
#   the guide trained by 30 LoRA steps on the soft pin (260 s) dead in both runs (no draw of 64 met
#   all seven pins); the mixture-taught guide in SMC (344 s) RMS 0.58, ESS/N 0.04. **The learned
#   twist** (`PositionTwist`, 30 CTL steps, 157 s of training) **meets the goal**: RMS 0.068 nats,
#   `n_eff`/N 0.93, 0.9× the CPU time of plain sampling of the same 64 × 8 tokens.
#   `benchmarks/RESULTS.md` §23 has the same pin with 4 seeds and the pins at $p$ = 0.72 and 0.010.
# - *The seed's sentence, in numbers.* "Not too rare" for fine-tuning by SVI is set by what training
#   sees, not by $p$ alone: trained on the hard pin the guide gets no signal below
#   $p \approx 3\cdot10^{-3}$ (section 1); trained on a shaped reward (the soft pin) a tabular guide
#   works down to $2.6\cdot10^{-9}$ on the toy, but 30 LoRA steps on SmolLM2 do not reach
#   $5.5\cdot10^{-7}$ (§23: just outside at $p$ = 0.010, RMS 0.121 with ESS/N 0.49). Pre-conditioning
#   via a prompt makes the pin common under $q$ (ESS/N 0.10 here, 0.26 at $p$ = 0.010 in §23) but
#   leaves π/q heavy-tailed: RMS 0.58 at $p$ = 0.72 and 1.1–1.8 nats at 0.010 and $5.5\cdot10^{-7}$
#   (§23), within 0.1 at no $p$ in the table. What carries the rare end is SMC with a learned twist, the one method whose
#   error stays below 0.1 nats at every $p$ measured, on both LMs, at the cost of plain sampling on
#   SmolLM2 plus minutes of training per condition.
