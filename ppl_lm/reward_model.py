"""A reward learned from preferences, as a Bayesian model, and how its uncertainty enters the conditional.

The reward model is linear in features, r_θ(x) = θ · φ(x), with a Normal prior on θ and the
Bradley–Terry likelihood of each observed choice: y_i ~ Bernoulli(σ(r_θ(chosen_i) − r_θ(rejected_i))),
y_i = 1. It is a Pyro program; :func:`fit_reward` runs Pyro's own inference on it (NUTS, SVI with a
multivariate Normal autoguide, a Laplace approximation, or MAP) and returns a :class:`RewardModel`
holding posterior draws of θ.

RLHF with a learned reward is then Bayesian conditioning with a learned likelihood e^{r/β}.
:func:`learned_reward` puts it in a model, with the reward's uncertainty handled one of three ways:

- ``"mean"``: the posterior-mean reward r̄ = θ̄ · φ(x), the point estimate RLHF uses;
  π′(x) ∝ π(x) e^{r̄(x)/β}.
- ``"marginal"``: the likelihood averaged over the posterior, π′(x) ∝ π(x) E_{θ|D}[e^{r_θ(x)/β}]
  (one logsumexp over the draws; a factor like any other, so every backend runs it).
- ``"mixture"``: the average of the per-θ RLHF optima, π′(x) = E_{θ|D}[π(x) e^{r_θ(x)/β} / Z(θ)]:
  a latent index s over the draws (uniform), and the factor r_s(x)/β − log Z(θ_s), with each
  log Z(θ_s) from :meth:`RewardModel.log_normalizers` (exact by enumeration on toy LMs, else
  estimated by prior importance sampling: consistent, biased low in log for finite samples).

DPO skips the reward model: ``ppl_lm.infer(model, method="svi", objective="dpo", preferences=prefs)``
fits the guide to the pairs directly (:mod:`ppl_lm.inference.svi.dpo`); its optimum is the RLHF
optimum under a free, unregularised reward per text seen in a pair, not under r_θ. When the
pairs cannot separate two explanations (features equal on every shown text:
``ppl_lm.models.preferences.ambiguous_raters``), the NUTS posterior of θ spreads over both, a MAP
reward picks one point, and ``"mixture"`` averages the two explanations' conditionals.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from .validation import check_int
from . import seeding
from .preferences import Preferences

__all__ = ["RewardModel", "fit_reward", "learned_reward", "FIT_METHODS", "UNCERTAINTY"]

FIT_METHODS = ("nuts", "svi", "laplace", "map")
UNCERTAINTY = ("mean", "marginal", "mixture")


def _pos_int(name: str, v) -> int:
    return check_int(name, v)


@dataclass
class RewardModel:
    """Posterior draws of a linear reward head: r_θ(x) = θ · features(x).

    Attributes:
        samples: ``[S, d]`` draws of θ (one row for MAP).
        features: the feature map ``[N, T] -> [N, d]`` (token ids to features).
        method: how it was fitted.
        diagnostics: ``rhat`` and ``ess_bulk`` per coordinate of θ (NUTS, two or more chains),
            ``train_accuracy`` (share of training pairs the mean reward orders right).
    """

    samples: torch.Tensor
    features: Callable[[torch.Tensor], torch.Tensor]
    method: str = "given"
    diagnostics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.samples = torch.as_tensor(self.samples, dtype=torch.float64)
        if self.samples.dim() == 1:
            self.samples = self.samples[None]
        if self.samples.dim() != 2 or not len(self.samples):
            raise ValueError(f"samples must be draws of θ, shape [S, d]; got {tuple(self.samples.shape)}")
        if not torch.isfinite(self.samples).all():
            raise ValueError("samples of θ hold non-finite values")

    @property
    def mean(self) -> torch.Tensor:
        """The posterior mean of θ ``[d]``."""
        return self.samples.mean(0)

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[N, d]`` (float64) of token ids ``x`` ``[N, T]``, checked."""
        f = torch.as_tensor(self.features(x)).double()
        if f.dim() != 2 or f.shape[0] != len(x) or f.shape[1] != self.samples.shape[1]:
            raise ValueError(f"features(x) must return [N, d] = [{len(x)}, {self.samples.shape[1]}], got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError("features(x) returned non-finite values")
        return f

    def reward(self, x: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """r_θ(x): ``[N]`` for one θ (default: the posterior mean), ``[S, N]`` for draws ``[S, d]``."""
        theta = self.mean if theta is None else torch.as_tensor(theta, dtype=torch.float64)
        return theta @ self.phi(x).T if theta.dim() == 2 else self.phi(x) @ theta

    def accuracy(self, prefs: Preferences, lm=None, max_new_tokens: int | None = None) -> float:
        """Share of pairs whose chosen text gets the larger posterior-mean reward (ties count half)."""
        c, r = _pair_tokens(prefs, lm, max_new_tokens)
        d = self.reward(c) - self.reward(r)
        return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())

    def log_normalizers(self, lm, prompt, max_new_tokens: int, beta: float, *, num_samples: int = 4096,
                        seed: int = 0) -> torch.Tensor:
        """log Z(θ_s) = log Σ_x π(x | prompt) e^{r_s(x)/β} for every draw ``[S]`` (for ``"mixture"``).

        Exact by enumeration when the support has at most 200,000 sequences (toy LMs), else
        estimated from ``num_samples`` prior draws shared by every θ_s (log-mean-exp of e^{r_s/β}).
        """
        from .tokens import support_size

        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        d = lm.sequence(prompt, max_new_tokens=max_new_tokens)
        with torch.no_grad():
            if support_size(lm.vocab_size, max_new_tokens) <= 200_000:
                from .inference.exact import enumerate_sequences

                xs = enumerate_sequences(lm.vocab_size, lm.eos_id, max_new_tokens)
                log_pi = d.log_prob(xs).double()
                return torch.logsumexp(log_pi + self.reward(xs, self.samples) / beta, -1)
            with seeding.seeded(seed):
                xs = d.expand(torch.Size([num_samples])).sample()
            return torch.logsumexp(self.reward(xs, self.samples) / beta, -1) - math.log(num_samples)


def _pair_tokens(prefs: Preferences, lm, max_new_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    if prefs.is_text:
        if lm is None or max_new_tokens is None:
            raise ValueError("these preferences are text: pass lm= and max_new_tokens= to encode them")
        return prefs.tokens(lm, max_new_tokens)
    return prefs.chosen, prefs.rejected


def _bt_model(delta: torch.Tensor, prior_scale: float):
    def model():
        d = delta.shape[1]
        theta = pyro.sample("theta", dist.Normal(torch.zeros(d, dtype=delta.dtype), prior_scale).to_event(1))
        with pyro.plate("pairs", len(delta)):
            pyro.sample("y", dist.Bernoulli(logits=delta @ theta), obs=torch.ones(len(delta), dtype=delta.dtype))

    return model


def fit_reward(prefs: Preferences, features: Callable[[torch.Tensor], torch.Tensor], method: str = "nuts", *,
               prior_scale: float = 1.0, num_samples: int = 1000, warmup_steps: int | None = None,
               num_chains: int = 2, num_steps: int = 1000, lr: float = 0.02, lm=None,
               max_new_tokens: int | None = None, seed: int = 0, progress: bool = False) -> RewardModel:
    """Fit the Bradley–Terry reward model r_θ(x) = θ · features(x) to preference pairs.

    Args:
        prefs: the pairs (:class:`~ppl_lm.Preferences`).
        features: ``[N, T]`` token ids -> ``[N, d]`` features (e.g. counts, or pooled LM hidden
            states); evaluated once per side.
        method: ``"nuts"`` (Pyro's NUTS, ``num_chains`` chains run one after another, R-hat and
            bulk ESS from ArviZ), ``"svi"`` (Pyro SVI with ``AutoMultivariateNormal``),
            ``"laplace"`` (``AutoLaplaceApproximation``: MAP, then the Hessian's Normal) or
            ``"map"`` (``AutoDelta``: one row).
        prior_scale: sd of the Normal prior on each coordinate of θ.
        num_samples: posterior draws kept (per chain for NUTS; from the fitted guide otherwise).
        warmup_steps: NUTS warm-up (default ``num_samples``).
        num_steps, lr: optimisation steps and Adam step size (svi, laplace, map).
        lm, max_new_tokens: to encode text preferences.
        seed: same seed, same draws.

    >>> import torch, ppl_lm
    >>> prefs = ppl_lm.Preferences(torch.tensor([[2, 0], [2, 2], [1, 2]]), torch.tensor([[1, 0], [1, 1], [1, 1]]))
    >>> rm = ppl_lm.fit_reward(prefs, lambda x: (x == 2).double().sum(-1, keepdim=True), method="map", num_steps=300)
    >>> bool(rm.samples[0, 0] > 0)   # more 2s is preferred
    True
    """
    if method not in FIT_METHODS:
        raise ValueError(f"method must be one of {FIT_METHODS}, got {method!r}")
    if not isinstance(prefs, Preferences):
        raise TypeError(f"prefs must be a ppl_lm.Preferences, got {type(prefs).__name__}")
    if not callable(features):
        raise TypeError("features must be a callable [N, T] token ids -> [N, d]")
    if not (isinstance(prior_scale, (int, float)) and math.isfinite(prior_scale) and prior_scale > 0):
        raise ValueError(f"prior_scale must be a positive number, got {prior_scale!r}")
    for name, v in (("num_samples", num_samples), ("num_chains", num_chains), ("num_steps", num_steps)):
        _pos_int(name, v)
    c, r = _pair_tokens(prefs, lm, max_new_tokens)
    fc, fr = torch.as_tensor(features(c)).double(), torch.as_tensor(features(r)).double()
    if fc.dim() != 2 or fc.shape != fr.shape or fc.shape[0] != len(prefs):
        raise ValueError(f"features must map [N, T] to [N, d]; got {tuple(fc.shape)} and {tuple(fr.shape)} for "
                         f"{len(prefs)} pairs")
    delta = fc - fr
    model = _bt_model(delta, float(prior_scale))
    diagnostics: dict = {}
    pyro.clear_param_store()
    with seeding.seeded(seed):
        if method == "nuts":
            samples, diagnostics = _nuts(model, num_samples, warmup_steps or num_samples, num_chains, progress)
        else:
            samples = _autoguide(model, method, num_samples, num_steps, lr)
    rm = RewardModel(samples, features, method, diagnostics)
    rm.diagnostics["train_accuracy"] = rm.accuracy(prefs, lm, max_new_tokens)
    return rm


def _nuts(model, num_samples, warmup_steps, num_chains, progress) -> tuple[torch.Tensor, dict]:
    from pyro.infer.mcmc import MCMC, NUTS

    from .diagnostics.estimators import arviz_scalar, import_arviz

    chains = []
    for _ in range(num_chains):  # one after another: no worker processes
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress)
        mcmc.run()
        chains.append(mcmc.get_samples()["theta"])
    draws = torch.stack(chains)  # [C, S, d]
    az = import_arviz()
    diagnostics = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = draws.numpy()
        diagnostics["ess_bulk"] = [arviz_scalar(az.ess(np.ascontiguousarray(arr[..., j]), method="bulk")) for j in range(arr.shape[-1])]
        if num_chains >= 2:
            diagnostics["rhat"] = [arviz_scalar(az.rhat(np.ascontiguousarray(arr[..., j]))) for j in range(arr.shape[-1])]
    return draws.reshape(-1, draws.shape[-1]), diagnostics


def _autoguide(model, method, num_samples, num_steps, lr) -> torch.Tensor:
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoDelta, AutoLaplaceApproximation, AutoMultivariateNormal
    from pyro.optim import Adam

    guide = {"svi": AutoMultivariateNormal, "laplace": AutoLaplaceApproximation, "map": AutoDelta}[method](model)
    svi = SVI(model, guide, Adam({"lr": lr}), Trace_ELBO())
    for _ in range(num_steps):
        loss = svi.step()
        if not math.isfinite(loss):
            raise FloatingPointError("the reward model's loss is not finite: check the features for huge values")
    if method in ("map", "laplace"):
        _polish(model, guide)
    if method == "laplace":
        guide = guide.laplace_approximation()  # the Hessian at the MAP: needs autograd
    with torch.no_grad():
        if method == "map":
            return guide.median()["theta"][None]
        # one site, θ, unconstrained: the guide's joint Normal over its latent vector is θ's law
        return guide.get_posterior().sample(torch.Size([num_samples]))


def _polish(model, guide) -> None:
    """Finish a point estimate by L-BFGS on its deterministic loss, −log p(θ, D) at the point.

    Adam's per-coordinate steps crawl along a flat ridge of the posterior (features the pairs
    cannot tell apart, where only the prior curves the loss), stopping short of the MAP; L-BFGS
    reaches it.
    """
    from pyro.infer import Trace_ELBO

    params = [p.unconstrained() for p in (pyro.get_param_store()[k] for k in pyro.get_param_store().keys())]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    elbo = Trace_ELBO()

    def closure():
        opt.zero_grad()
        loss = elbo.differentiable_loss(model, guide)
        loss.backward()
        return loss

    opt.step(closure)


def learned_reward(name: str, rm: RewardModel, x: torch.Tensor, beta: float, uncertainty: str = "mean",
                   log_normalizers: torch.Tensor | None = None) -> torch.Tensor:
    """The learned reward as the likelihood of ``x`` (see the module notes for the three modes).

    ``"mean"`` and ``"marginal"`` are :func:`ppl_lm.reward` factors (for ``"marginal"`` the reward
    recorded is the certainty equivalent β·log E_θ[e^{r_θ/β}]). ``"mixture"`` samples a latent site
    ``{name}:draw`` (uniform over the draws) and needs ``log_normalizers`` ``[S]``
    (:meth:`RewardModel.log_normalizers`). Returns the reward recorded ``[N]``.
    """
    from .conditions import reward

    if uncertainty not in UNCERTAINTY:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY}, got {uncertainty!r}")
    if not isinstance(rm, RewardModel):
        raise TypeError(f"rm must be a RewardModel (from ppl_lm.fit_reward), got {type(rm).__name__}")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if uncertainty == "mean":
        r = rm.reward(x)
    elif uncertainty == "marginal":
        r_s = rm.reward(x, rm.samples)  # [S, N]
        r = beta * (torch.logsumexp(r_s / beta, 0) - math.log(len(rm.samples)))
    else:
        S = len(rm.samples)
        if log_normalizers is None:
            raise ValueError("uncertainty='mixture' needs log_normalizers=rm.log_normalizers(lm, prompt, T, beta): "
                             "each draw's log Z(θ), so that every θ's optimum gets its own weight")
        log_z = torch.as_tensor(log_normalizers, dtype=torch.float64)
        if log_z.shape != (S,) or not torch.isfinite(log_z).all():
            raise ValueError(f"log_normalizers must be {S} finite numbers, one per draw; got shape {tuple(log_z.shape)}")
        s = pyro.sample(f"{name}:draw", dist.Categorical(logits=torch.zeros(S)))
        r_s = rm.reward(x, rm.samples)  # [S, N]
        s_idx = s.reshape(-1).long().expand(r_s.shape[1]) if s.numel() == 1 else s.reshape(-1).long()
        r = r_s.gather(0, s_idx[None])[0] - beta * log_z[s_idx]
    reward(name, r.float(), beta=beta)
    return r
