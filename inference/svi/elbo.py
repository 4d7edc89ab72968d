"""The ELBO of an LM guide: a score-function estimator with a leave-one-out baseline.

For the model "prior π, likelihood exp(r/β)" and a guide q, per particle
``f(x) = log p(x, obs) − log q(x) = log π(x) + r(x)/β − log q(x)``, and
``ELBO = E_q[f] = (E_q[r] − β·KL(q‖π))/β``, ``log Z − ELBO = KL(q‖π')`` with
``π'(x) ∝ π(x)·exp(r(x)/β)``: maximising the ELBO is KL-regularised reward maximisation.

The site is discrete and sampled by the LM, so the gradient is the score-function one,
``∇ELBO = E_q[f(x)·∇log q(x)]``. :class:`RLOO_ELBO` draws ``num_particles`` sequences in one
vectorised plate and uses, for particle ``i``, the mean of the *other* particles' ``f`` as its
baseline (RLOO): the surrogate ``−mean_i[(f_i − mean_{j≠i} f_j)·log q(x_i)]`` has exactly the
gradient ``−∇ELBO`` in expectation, with far less variance than without a baseline.

Pyro's own estimators do not fit this site: ``Trace_ELBO`` ignores baselines,
``TraceGraph_ELBO`` drops a reward that lost its provenance (text rewards leave torch),
``TraceMeanField_ELBO`` / ``RenyiELBO`` assume what an LM site does not give. So this module
writes ``loss_and_grads`` on ``poutine.trace`` of the guide and ``poutine.replay`` of the model.

Hard conditions make the reverse KL infinite while the guide violates them. With
``relax_penalty=c`` every ``-inf`` condition factor is replaced by ``-c`` (training only);
correct the trained guide afterwards by importance sampling against the exact target (as
``method="svi"`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO

from ppl_lm.inference._runtime import PARTICLE_PLATE

__all__ = ["RLOO_ELBO", "ParticleTerms", "particle_terms", "summarise"]


@dataclass
class ParticleTerms:
    """Per-particle pieces of the ELBO (each ``[N]``)."""

    log_q: torch.Tensor  # guide log-probability (differentiable w.r.t. the guide's parameters)
    log_prior: torch.Tensor  # log π(x) of the latent sites
    log_likelihood: torch.Tensor  # sum of condition factors (relaxed where asked)
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # raw r per reward site
    betas: dict[str, float] = field(default_factory=dict)
    constraints: dict[str, torch.Tensor] = field(default_factory=dict)  # ok per constraint site
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def f(self) -> torch.Tensor:
        """``log p(x, obs) − log q(x)`` per particle, detached."""
        return (self.log_prior + self.log_likelihood - self.log_q.detach()).detach()


class _FixLatent(poutine.messenger.Messenger):
    """Give latent sites fixed values (still latent): evaluation on a given support."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def _pyro_sample(self, msg):
        if msg["name"] in self.data and not msg["is_observed"]:
            msg["value"] = self.data[msg["name"]]
            msg["done"] = True


def _per_particle(lp, n: int, name: str) -> torch.Tensor:
    lp = torch.as_tensor(lp)
    if lp.dim() == 0:
        return lp.expand(n)
    if lp.shape[0] != n:
        raise ValueError(
            f"site {name!r} has log-prob shape {tuple(lp.shape)}; it must lie inside the particle plate "
            f"'{PARTICLE_PLATE}' (models are written vectorised: one value per particle)")
    return lp.reshape(n, -1).sum(-1)


def particle_terms(model: Callable, guide: Callable, args: tuple, kwargs: dict, num_particles: int,
                   *, relax_penalty: float | None = None, values: dict | None = None) -> ParticleTerms:
    """Run ``guide`` then the model replayed on its draws, ``num_particles`` at once.

    Args:
        relax_penalty: replace each ``-inf`` condition factor by ``-relax_penalty``; ``None``
            keeps them (and raises if a particle violates a hard condition).
        values: fix the guide's latent sites to these values ``[num_particles, ...]`` instead
            of sampling (to evaluate the ELBO exactly on an enumerated support); ``-inf`` terms
            are then returned as they are.
    """
    n = num_particles
    g = guide if values is None else _FixLatent(values)(guide)
    with pyro.plate(PARTICLE_PLATE, n, dim=-1):
        guide_tr = poutine.trace(g).get_trace(*args, **kwargs)
        with torch.no_grad():
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)

    log_q = torch.zeros(n)
    guide_latent = []
    for name, site in guide_tr.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            guide_latent.append(name)
            log_q = log_q + _per_particle(site["fn"].log_prob(site["value"]), n, name).float()
    if not guide_latent:
        raise ValueError("the guide samples no latent site; it must sample the model's latent site(s)")

    log_prior, log_lik = torch.zeros(n), torch.zeros(n)
    out = ParticleTerms(log_q, log_prior, log_lik)
    with torch.no_grad():
        for name, site in model_tr.nodes.items():
            if site["type"] != "sample":
                continue
            lp = _per_particle(site["fn"].log_prob(site["value"]), n, name).float()
            if not site["is_observed"]:
                if name not in guide_latent:
                    raise ValueError(
                        f"the model's latent site {name!r} is not sampled by the guide; the guide must "
                        "cover every latent site of the model")
                out.values[name] = site["value"]
                log_prior = log_prior + lp
                continue
            meta = site["infer"].get("ppl_lm") or {}
            if meta.get("kind") == "reward":
                out.rewards[name] = _per_particle(meta["r"], n, name).float()
                out.betas[name] = meta["beta"]
            elif meta.get("kind") == "constraint":
                out.constraints[name] = _per_particle(meta["ok"], n, name).bool()
            if relax_penalty is not None:
                lp = torch.where(lp == -math.inf, torch.full_like(lp, -float(relax_penalty)), lp)
            log_lik = log_lik + lp
    missing = set(guide_latent) - set(out.values)
    if missing:
        raise ValueError(f"the guide samples site(s) {sorted(missing)} that the model does not have as latent sites")
    if torch.isnan(log_prior).any() or torch.isnan(log_lik).any() or torch.isnan(log_q).any():
        raise FloatingPointError("NaN in the ELBO terms: the LM, the guide or a reward produced NaN")
    if values is None and (log_prior == -math.inf).any():
        raise ValueError(
            "the guide drew a sequence the prior gives probability zero: the ELBO is -inf. The guide's "
            "support must lie inside the prior's")
    if values is None and (log_lik == -math.inf).any():
        raise ValueError(
            "a guide draw violates a hard condition, so the reverse KL (and the ELBO) is -inf. Train on "
            "the relaxed penalty (relax_penalty=10, the svi default) and correct by importance sampling")
    out.log_prior, out.log_likelihood = log_prior, log_lik
    return out


class RLOO_ELBO(ELBO):
    """Score-function ELBO over vectorised particles with a leave-one-out baseline.

    Usable wherever Pyro takes an ``ELBO``: ``pyro.infer.SVI(model, guide, optim, loss=RLOO_ELBO(8))``.
    Only the guide is trained (the model's LM is the fixed prior). After each call,
    :attr:`last` holds the step's estimates: ``elbo``, ``kl_prior`` (KL(q‖π)), ``reward:NAME``
    (E_q[r], raw r), ``ok:NAME`` (fraction satisfying each constraint).

    Args:
        num_particles: particles per step (>= 2: the baseline needs another particle).
        relax_penalty: finite penalty replacing ``-inf`` condition factors during training
            (``None``: hard conditions stay hard, and a violating draw raises).
    """

    def __init__(self, num_particles: int = 8, relax_penalty: float | None = None):
        if not isinstance(num_particles, int) or num_particles < 2:
            raise ValueError(f"num_particles must be an integer >= 2 (a leave-one-out baseline), got {num_particles!r}")
        if relax_penalty is not None and not (math.isfinite(relax_penalty) and relax_penalty > 0):
            raise ValueError(f"relax_penalty must be a finite number > 0 or None, got {relax_penalty!r}")
        super().__init__(num_particles=num_particles, max_plate_nesting=1, vectorize_particles=False)
        self.relax_penalty = relax_penalty
        self.last: dict[str, float] = {}

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - ELBO's abstract hook
        raise NotImplementedError("RLOO_ELBO vectorises its particles in one plate; it has no per-particle traces")

    def _surrogate(self, model, guide, args, kwargs):
        terms = particle_terms(model, guide, args, kwargs, self.num_particles, relax_penalty=self.relax_penalty)
        f = terms.f.double()
        n = self.num_particles
        baseline = (f.sum() - f) / (n - 1)
        surrogate = -((f - baseline).float() * terms.log_q).mean()
        self.last = summarise(terms)
        return surrogate, terms

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Estimate of −ELBO (no gradients)."""
        with torch.no_grad():
            terms = particle_terms(model, guide, args, kwargs, self.num_particles, relax_penalty=self.relax_penalty)
        self.last = summarise(terms)
        return -self.last["elbo"]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The surrogate loss (its gradient estimates −∇ELBO; its value is not −ELBO)."""
        return self._surrogate(model, guide, args, kwargs)[0]

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate −ELBO and accumulate the RLOO score-function gradient into the guide's parameters."""
        surrogate, _ = self._surrogate(model, guide, args, kwargs)
        if surrogate.requires_grad:
            surrogate.backward()
        return -self.last["elbo"]


def summarise(terms: ParticleTerms) -> dict[str, float]:
    """Step estimates: ``elbo``, ``kl_prior``, ``reward:NAME`` (raw r), ``ok:NAME``."""
    out = {
        "elbo": float(terms.f.double().mean()),
        "kl_prior": float((terms.log_q.detach() - terms.log_prior).double().mean()),
    }
    for name, r in terms.rewards.items():
        out[f"reward:{name}"] = float(r.double().mean())
    for name, ok in terms.constraints.items():
        out[f"ok:{name}"] = float(ok.double().mean())
    return out
