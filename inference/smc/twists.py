"""Learned twists for SMC: ψ_t(x_{1:t}) ≈ E_π[e^{r(x)} | x_{1:t}], learned or computed exactly.

A twist is a :class:`Twist` (a ``torch.nn.Module``): called on the prefixes ``[B, t]`` of the
first sequence site (and the LM's incremental state), it returns ``log ψ [B, V]``, the log twist
of each prefix extended by each next token v. With ``twist=`` SMC (``method="smc"``) then

- proposes each token from q(v | x_{<t}) ∝ π(v | x_{<t})·ψ(x_{<t}, v) (times the proposal LM and
  token masks, if any): the *twisted proposal*;
- uses log ψ(x_{≤t}) as the intermediate log-target of an unfinished particle, in place of the
  model's prefix scores, which keep only their pruning (a prefix a ``prefix_closed`` constraint
  rejects dies);
- gives a particle whose sequence has ended its exact score, so every twist is divided out: the
  weights telescope to π(x)·e^{r(x)} / (proposal), the final weights are exact and log Ẑ is
  unbiased whatever ψ is.

The optimal twist ψ*(x_{≤t}) = E_π[e^{r} | x_{≤t}] (the exact score for an ended sequence) makes
every incremental weight constant: log Ẑ = log Z with zero variance. :func:`exact_twist` computes
it by enumeration on toy LMs (as a :class:`TableTwist`); :func:`learn_twist` learns a twist by
contrastive twist learning (Zhao, Brekelmans, Makhzani & Grosse, 2024, "Probabilistic inference
in language models via twisted sequential Monte Carlo"): the gradient of
Σ_t KL(σ_t ‖ π_t ψ_t / Z_t) is Σ_t E_{π_t ψ_t}[∇ log ψ_t] − E_{σ_t}[∇ log ψ_t], where σ_t is the
target's marginal on x_{≤t} (positive draws: the final particles of SMC run with the current
twist, or exact draws) and π_t ψ_t the twisted intermediate target (negative draws: the SMC
particles before each step, the next token summed out exactly). CTL identifies log ψ_t up to a
constant per position t; that constant changes nothing while every particle ends at the same
position (e.g. a condition at the last positions), and costs variance, never bias, otherwise.
The alternative, least squares on the optimal twist's one-step identity (``objective=
"regression"``), sees only the particles that survive, so nothing tells it that the tokens
which kill a particle should get ψ = 0; on the toy pins it did not lower the variance at all
(benchmarks/RESULTS.md, section 18).

>>> import torch, pyro, ppl_lm
>>> from ppl_lm.inference.smc.twists import exact_twist
>>> lm = ppl_lm.MarkovLM.random(4, eos_id=0, seed=1)
>>> def model():
...     x = pyro.sample("x", lm.sequence([1], max_new_tokens=4))
...     ppl_lm.pin("end", x, {3: 2})
>>> psi = exact_twist(model)
>>> runs = [ppl_lm.infer(model, method="smc", twist=psi, num_particles=8, seed=s, progress=False).log_evidence
...         for s in range(3)]
>>> exact = ppl_lm.infer(model, method="exact").log_evidence
>>> max(abs(z - exact) for z in runs) < 1e-5  # float32 table: zero variance up to rounding
True
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from ppl_lm.inference._runtime import latent_sites, sequence_sites

__all__ = ["Twist", "TableTwist", "PositionTwist", "TwistTraining", "exact_twist", "learn_twist", "learned_twist",
           "twist_logits"]

log = logging.getLogger(__name__)


class Twist(torch.nn.Module):
    """A learned twist: ``forward(prefix [B, t], lm_state) -> log ψ [B, V]``, the log twist of each
    prefix followed by each next token (``lm_state``: the site LM's incremental state after the
    prefix, :class:`~ppl_lm.lm.LMState`, for twists that read the LM's own features).

    Attributes:
        vocab_size: V, the width of ``log ψ``.
        max_new_tokens: the sequence length the twist covers.
    """

    vocab_size: int
    max_new_tokens: int

    def forward(self, prefix: torch.Tensor, lm_state=None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TableTwist(Twist):
    """log ψ(x_{<t}, v) = ``table[t, x_{t-1}, v]`` (``x_{-1}`` is a start row): a function of the
    position, the last token and the next one. Exact for a Markov LM under conditions on token
    positions (pins, a token at the end), where the optimal twist of a prefix that the model's
    prefix scores keep depends on nothing else.

    Args:
        max_new_tokens: T, the positions covered.
        vocab_size: V.
        table: optional initial values ``[T, V + 1, V]`` (zeros: no twist).
    """

    def __init__(self, max_new_tokens: int, vocab_size: int, table: torch.Tensor | None = None):
        super().__init__()
        self.max_new_tokens, self.vocab_size = int(max_new_tokens), int(vocab_size)
        shape = (self.max_new_tokens, self.vocab_size + 1, self.vocab_size)
        if table is None:
            table = torch.zeros(shape)
        if tuple(table.shape) != shape:
            raise ValueError(f"a TableTwist table has shape [T, V + 1, V] = {list(shape)}, got {list(table.shape)}")
        self.table = torch.nn.Parameter(table.float().clone())

    def forward(self, prefix: torch.Tensor, lm_state=None) -> torch.Tensor:
        t = prefix.shape[-1]
        if t >= self.max_new_tokens:
            raise ValueError(f"this TableTwist covers {self.max_new_tokens} positions; got a prefix of {t} tokens")
        prev = prefix[:, -1] if t else torch.full(prefix.shape[:1], self.vocab_size, dtype=torch.long)
        return self.table[t][prev.to(self.table.device)]


class PositionTwist(Twist):
    """log ψ(x_{<t}, v) = ``table[t, v]``: a function of the position and the next token only, for
    any LM (SmolLM2 included: T·V parameters). Exact when the condition's odds depend on each
    token only through its position given the LM (e.g. pins of the first tokens); elsewhere a
    cheap approximation that SMC corrects exactly.

    Args:
        max_new_tokens: T, the positions covered.
        vocab_size: V.
    """

    def __init__(self, max_new_tokens: int, vocab_size: int):
        super().__init__()
        self.max_new_tokens, self.vocab_size = int(max_new_tokens), int(vocab_size)
        self.table = torch.nn.Parameter(torch.zeros(self.max_new_tokens, self.vocab_size))

    def forward(self, prefix: torch.Tensor, lm_state=None) -> torch.Tensor:
        t = prefix.shape[-1]
        if t >= self.max_new_tokens:
            raise ValueError(f"this PositionTwist covers {self.max_new_tokens} positions; got a prefix of {t} tokens")
        return self.table[t].expand(prefix.shape[0], -1)


# -- the hook SMC calls (inference/smc/sweep.py) ----------------------------------------------
def twist_logits(twist: Twist, prefix: torch.Tensor, lm_state, active: torch.Tensor, log_w: torch.Tensor,
                 current: torch.Tensor) -> torch.Tensor:
    """``twist(prefix, lm_state)``, checked (``[B, V]``, no NaN or +inf); a twist with an ``observe``
    method (the trainer's recorder) is shown the particles first: the rows still advancing, their
    log weights, current log twists and the LM's next-token log-probs."""
    observe = getattr(twist, "observe", None)
    if observe is not None:
        observe(prefix, lm_state.logprobs, active, log_w, current)
    log_psi = twist(prefix, lm_state)
    B, V = lm_state.logprobs.shape
    if tuple(log_psi.shape) != (B, V):
        raise ValueError(f"a twist returned log ψ of shape {tuple(log_psi.shape)}, expected [particles, vocab] = "
                         f"[{B}, {V}]")
    if bool(torch.isnan(log_psi).any() | (log_psi == math.inf).any()):
        raise FloatingPointError("a twist returned NaN or +inf: log ψ must be finite or -inf (an impossible token)")
    return log_psi


def learned_twist(score: torch.Tensor, log_psi: torch.Tensor, unfinished: torch.Tensor) -> torch.Tensor:
    """The log twist of each particle after a step: log ψ of its prefix where it is ``unfinished`` and
    the model's prefix score keeps it (a pruned prefix stays pruned); the model's ``score`` elsewhere
    (an ended sequence's exact score divides the twist out)."""
    log_psi = log_psi.double().cpu()
    return torch.where(unfinished & torch.isfinite(score), log_psi, score)


# -- the exact optimal twist (toy LMs) -------------------------------------------------------
def _site(model, args, kwargs):
    seq = sequence_sites(latent_sites(model, args, kwargs, placeholder=True))
    if len(seq) != 1:
        raise ValueError(f"a twist covers the model's one latent sequence site; this model has {len(seq)} "
                         f"({list(seq)})")
    name, d = next(iter(seq.items()))
    if math.prod(d.prompt.shape[:-1]) != 1:  # one row ([P] or [1, P]) is one shared prompt
        raise ValueError(f"site {name!r} has a batch of prompts; a twist here needs one shared prompt")
    return name, d


def exact_twist(model, *args, model_kwargs: dict | None = None, atol: float = 1e-4) -> TableTwist:
    """The optimal twist ψ*(x_{≤t}) = E_π[e^{r} | x_{≤t}] by enumeration (``method="exact"``), as
    a :class:`TableTwist`: log ψ* = log Z + log σ(x_{≤t}) − log π(x_{≤t}) on every prefix the
    posterior reaches, −inf elsewhere.

    Raises:
        ValueError: the model has not exactly one latent sequence site, or ψ* is not a function of
            (position, last token, next token) on the posterior's prefixes (then no table holds it).
    """
    from ppl_lm.inference import exact

    kwargs = dict(model_kwargs or {})
    name, d = _site(model, args, kwargs)
    post = exact.run(model, *args, model_kwargs=kwargs, progress=False)
    x = post.values[name]
    M, T = x.shape
    V = d.lm.vocab_size
    with torch.no_grad():
        log_prior = d.lm.token_logprobs(d.prompt_rows(1)[0], x).double().cumsum(-1)  # log π(x_{≤t}) [M, T]
    log_w = post.log_weights.double()
    table = torch.full((T, V + 1, V), -math.inf, dtype=torch.float64)
    ended = torch.zeros(M, dtype=torch.bool)
    for t in range(T):
        rows = (~ended).nonzero()[:, 0]
        keys, inverse = torch.unique(x[rows, : t + 1], dim=0, return_inverse=True)
        log_sigma = torch.full((len(keys),), -math.inf, dtype=torch.float64)
        log_sigma = log_sigma.scatter_reduce(0, inverse, log_w[rows], "amax")  # stabiliser, then a sum
        mass = torch.zeros(len(keys), dtype=torch.float64).index_add(0, inverse, (log_w[rows] - log_sigma[inverse]).exp())
        log_v = post.log_evidence + log_sigma + mass.log() - log_prior[rows[_first(inverse, len(keys))], t]
        prev = keys[:, t - 1] if t else torch.full((len(keys),), V, dtype=torch.long)
        cell = t * (V + 1) * V + prev * V + keys[:, t]
        flat = table.view(-1)
        hi = torch.full_like(flat, -math.inf).scatter_reduce(0, cell, log_v, "amax")
        lo = torch.full_like(flat, math.inf).scatter_reduce(0, cell, log_v, "amin")
        seen = torch.isfinite(hi)
        if bool(((hi - lo)[seen] > atol).any()):
            raise ValueError("the optimal twist of this model is not a function of (position, last token, next "
                             "token), so a TableTwist cannot hold it; use learn_twist with another Twist")
        flat[seen] = hi[seen]
        ended = ended | (x[:, t] == d.lm.eos_id)
    return TableTwist(T, V, table.float())


def _first(inverse: torch.Tensor, n: int) -> torch.Tensor:
    """For each group 0..n-1 of ``inverse``, the index of one of its members."""
    return torch.zeros(n, dtype=torch.long).scatter_(0, inverse, torch.arange(len(inverse)))


# -- contrastive twist learning --------------------------------------------------------------
class _Recorder(Twist):
    """Delegates to a twist and records, at every step of one SMC run, what CTL's negative phase
    needs: the advancing rows' prefixes, log weights, current log twists and next-token log-probs."""

    def __init__(self, twist: Twist):
        super().__init__()
        self.twist, self.vocab_size, self.max_new_tokens = twist, twist.vocab_size, twist.max_new_tokens
        self.steps: list[tuple] = []

    def forward(self, prefix, lm_state=None):
        return self.twist(prefix, lm_state)

    def observe(self, prefix, logprobs, active, log_w, current):
        rows = (active & torch.isfinite(log_w)).nonzero()[:, 0]
        self.steps.append((prefix[rows.to(prefix.device)].cpu(), logprobs[rows.to(logprobs.device)].detach().cpu(),
                           log_w[rows].clone(), current[rows].clone()))


@dataclass
class TwistTraining:
    """What :func:`learn_twist` did: the CTL loss, and SMC's log Ẑ and ESS with the twist of each step."""

    loss: list[float] = field(default_factory=list)
    log_evidence: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    wall_time: float = 0.0


def _ctl_loss(twist: Twist, steps: list[tuple], pos: torch.Tensor, pos_log_w: torch.Tensor, eos: int) -> torch.Tensor:
    """Σ_t [log Σ_{rows, v} W_row π(v|row) ψ_t(row, v) / ψ_{t-1}(row) − E_{σ}[log ψ_t]]: its gradient is
    CTL's, E_{π_t ψ_t}[∇ log ψ_t] − E_{σ_t}[∇ log ψ_t] (the negatives' next token summed out)."""
    loss = torch.zeros(())
    ended = torch.zeros(len(pos), dtype=torch.bool)
    for t, (prefix, logprobs, log_w, current) in enumerate(steps):
        live = (~ended).nonzero()[:, 0]
        ended = ended | (pos[:, t] == eos) if t < pos.shape[1] else ended
        if not len(prefix) or not len(live):
            continue
        w = torch.softmax(pos_log_w[live], 0).float()
        psi_pos = twist(pos[live, :t]).gather(-1, pos[live, t : t + 1])[:, 0]
        psi_pos = torch.where(w > 0, psi_pos, torch.zeros_like(psi_pos))  # 0·(-inf) would be NaN
        neg = (log_w - current).float()[:, None] + logprobs + twist(prefix)
        loss = loss + torch.logsumexp(neg.flatten(), 0) - (w * psi_pos).sum()
    return loss


def _regression_loss(twist: Twist, steps: list[tuple], final: torch.Tensor, final_log_w: torch.Tensor,
                     final_score: torch.Tensor, eos: int) -> torch.Tensor:
    """Least squares on the optimal twist's one-step identity, on SMC's particles: log ψ(x_{≤t}) =
    log Σ_v π(v|x_{≤t}) ψ(x_{≤t}, v) (the right side held fixed, as in temporal-difference
    learning), weighted by the particles' weights at each step, and log ψ(x) = r(x) for each final
    particle x at its last token (its exact score)."""
    loss = torch.zeros(())
    for prefix, logprobs, log_w, _ in steps[1:]:
        if not len(prefix):
            continue
        w = torch.softmax(log_w, 0).float()
        pred = twist(prefix[:, :-1]).gather(-1, prefix[:, -1:])[:, 0]
        with torch.no_grad():
            target = torch.logsumexp(logprobs + twist(prefix), -1).clamp_min(-50.0)
        loss = loss + (w * (pred - target).square()).sum()
    ok = torch.isfinite(final_log_w) & torch.isfinite(final_score)
    if bool(ok.any()):
        x, w = final[ok], torch.softmax(final_log_w[ok], 0).float()
        is_eos = torch.cat([(x[:, :-1] == eos), torch.ones(len(x), 1, dtype=torch.bool)], -1)
        end = is_eos.float().argmax(-1)  # the last token: the first EOS, else the last position
        for t in end.unique().tolist():
            rows = (end == t).nonzero()[:, 0]
            pred = twist(x[rows, :t]).gather(-1, x[rows, t : t + 1])[:, 0]
            loss = loss + (w[rows] * (pred - final_score[ok][rows].float()).square()).sum()
    return loss


def learn_twist(model, *args, model_kwargs: dict | None = None, twist: Twist | None = None, steps: int = 100,
                num_particles: int = 256, lr: float = 3.0, optimizer=torch.optim.SGD, objective: str = "ctl", positives=None, seed: int = 0,
                smc_options: dict | None = None, record: TwistTraining | None = None) -> Twist:
    """Learn a twist for SMC on ``model`` by contrastive twist learning (see the module notes).

    Each step runs SMC (``num_particles``, one island) with the current twist, takes its particles
    before each step as negative draws and its final weighted particles (or ``positives``) as
    positive draws, and takes one optimizer step on the CTL loss.

    Args:
        model, *args, model_kwargs: the model, as for :func:`ppl_lm.infer`; it has one latent
            sequence site.
        twist: the twist to train (default: a zero :class:`TableTwist` over the site's positions
            and vocabulary).
        steps: Adam steps (0 returns ``twist`` untrained).
        num_particles: SMC particles per step.
        lr: the learning rate.
        optimizer: a ``torch.optim`` optimizer class. Plain SGD by default: CTL's gradient on an
            entry is a difference of probability masses, so entries that SMC rarely visits move
            little; Adam's per-entry normalisation pushed such entries (feasible tokens SMC had not
            sampled yet) down at full speed and gave heavy-tailed Ẑ (toy pin at p = 1e-5, 200 steps:
            E[Ẑ/Z] 1.24 ± 0.25 and Var(log Ẑ) 0.13 with Adam at lr 0.1; 0.999 ± 0.003 and 0.0014 with
            SGD at lr 3).
        objective: ``"ctl"`` (contrastive twist learning, the default: on the toy pins it reached a
            lower Var(log Ẑ) per step, benchmarks/RESULTS.md section 18) or ``"regression"`` (least
            squares on the optimal twist's one-step identity, on SMC's particles, anchored at the
            final particles' exact scores; ``positives`` are not used).
        positives: a :class:`~ppl_lm.Posterior` whose weighted draws of the site stand for the target
            (e.g. ``method="exact"`` on a toy, or exact draws by rejection); default: each step's
            SMC particles.
        seed: step k runs SMC with seed ``seed + k``.
        smc_options: more options of SMC's ``run`` (e.g. ``ess_threshold``).
        record: a :class:`TwistTraining` to fill with the loss, log Ẑ and ESS of each step.

    Returns:
        The trained twist (``twist=`` of ``method="smc"``).
    """
    from . import run as smc_run

    kwargs = dict(model_kwargs or {})
    if objective not in ("ctl", "regression"):
        raise ValueError(f"objective must be 'ctl' or 'regression', got {objective!r}")
    if steps < 0 or num_particles < 2:
        raise ValueError(f"learn_twist needs steps >= 0 and num_particles >= 2, got {steps} and {num_particles}")
    name, d = _site(model, args, kwargs)
    if twist is None:
        twist = TableTwist(d.max_new_tokens, d.lm.vocab_size)
    if twist.vocab_size != d.lm.vocab_size:
        raise ValueError(f"the twist's vocabulary ({twist.vocab_size}) is not the LM's ({d.lm.vocab_size})")
    opts = {"num_particles": num_particles, "chunk_size": num_particles, "progress": False, **(smc_options or {})}
    record = record if record is not None else TwistTraining()
    t0 = time.perf_counter()
    opt = optimizer(twist.parameters(), lr=lr)
    for k in range(steps):
        rec = _Recorder(twist)
        try:
            with warnings.catch_warnings():  # the training runs' diagnostics (few draws, low ESS) are expected
                warnings.simplefilter("ignore")
                post = smc_run(model, *args, model_kwargs=kwargs, seed=seed + k, twist=rec, **opts)
        except ValueError as err:  # no particle met the condition: no positive draws this step
            if "every particle died" not in str(err):
                raise
            record.loss.append(math.nan)
            record.log_evidence.append(-math.inf)
            record.ess.append(0.0)
            continue
        src = post if positives is None else positives
        pos, pos_log_w = src.values[name].to(torch.long).cpu(), src.log_weights.double().cpu()
        opt.zero_grad()
        if objective == "ctl":
            loss = _ctl_loss(twist, rec.steps, pos, pos_log_w, d.lm.eos_id)
        else:
            loss = _regression_loss(twist, rec.steps, post.values[name].cpu(), post.log_weights.double().cpu(),
                                    post.stats["log_likelihood"].cpu(), d.lm.eos_id)
        loss.backward()
        opt.step()
        record.loss.append(float(loss.detach()))
        record.log_evidence.append(post.log_evidence)
        record.ess.append(post.ess)
        log.debug("learn_twist: step %d, loss %.4f, log Z %.4f, ESS %.1f", k, record.loss[-1], post.log_evidence, post.ess)
    record.wall_time = time.perf_counter() - t0
    if steps and not any(math.isfinite(x) for x in record.loss[-steps:]):
        raise ValueError(f"learn_twist: every particle died in all {steps} SMC runs, so no step had positive draws; "
                         "use more num_particles, or pass exact draws as positives=")
    return twist
