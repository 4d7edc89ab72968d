"""Direct preference optimisation (DPO) as an SVI objective: the guide fitted to preference pairs.

DPO (Rafailov et al. 2023) reads the guide q as an implicit reward against a reference policy
π, ``r_q(y | c) = β·(log q(y | c) − log π(y | c))``, and fits it to the pairs by the Bradley–Terry
likelihood of the rater's choices:

    loss(q) = mean over pairs of −log σ(r_q(y_w | c) − r_q(y_l | c)).

Here π is the model's own LM (the prior of its latent ``lm.sequence`` site) and β the model's
temperature (the β of its reward factors, or ``beta=``). If the pairs came from a rater with
utility u (Bradley–Terry, temperature 1) and covered every text, the minimiser would be the
RLHF optimum under the true utility, q ∝ π·e^{u/β}, which is the posterior of the model
"prior π, likelihood e^{u/β}". With finite data it is the same formula under the
*unregularised* maximum-likelihood Bradley–Terry reward, one free value per text seen in a
pair (:func:`exact_dpo_optimum`):

- texts never seen in a pair do not enter the loss, so any mass q puts on them (up to the
  normaliser) is optimal too: DPO's solution is not unique off the data's support;
- when one set of texts never loses to the rest, the loss has no minimum (its infimum pushes
  that set's reward to +∞): DPO then drives q toward a degenerate guide, which a prior on the
  reward (RLHF under a Bayesian reward model, :func:`ppl_lm.fit_reward`) does not.

The loss is deterministic given the minibatch of pairs, so its gradient is an ordinary one
through ``log q`` (no score function). It plugs into the shared training loop
(:mod:`~ppl_lm.inference.svi.training`) with the interface of the sampling estimators.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ppl_lm.validation import check_int
from ppl_lm.conditions.factors import factor_of
from ppl_lm import seeding
from ppl_lm.inference._runtime import latent_sites, run_model, sequence_sites
from ppl_lm.inference.svi.elbo import trace_guide
from ppl_lm.inference.svi.guides import model_site
from ppl_lm.preferences import Preferences

__all__ = ["DEFAULT_BATCH_SIZE", "DPOLoss", "PreferencePairs", "dpo_loss", "exact_dpo_optimum", "implicit_reward",
           "model_beta", "prepare_pairs"]

#: Pairs per step when ``batch_size`` is not given (all of them when there are fewer).
DEFAULT_BATCH_SIZE = 64


def implicit_reward(log_q: torch.Tensor, log_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward ``β·(log q − log π)``."""
    return beta * (log_q - log_ref)


def dpo_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """The Bradley–Terry negative log-likelihood of the choices, ``mean −log σ(r_w − r_l)``."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@dataclass(frozen=True)
class PreferencePairs:
    """Pairs ready for training: token ids ``[n, T]``, the context (model arguments) of each pair
    (``contexts[context_index[i]]``) and the reference log-probabilities ``log π`` ``[n]``."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    contexts: list[tuple]
    context_index: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)


def _sequence_site(model: Callable, args: tuple, kwargs: dict) -> tuple[str, object]:
    sites = latent_sites(model, args, kwargs, placeholder=True)
    seq = sequence_sites(sites)
    if len(sites) != 1 or len(seq) != 1:
        raise ValueError(
            f"objective='dpo' trains a guide of the model's one latent lm.sequence(...) site against the pairs; this "
            f"model has latent site(s) {list(sites)} ({len(seq)} of them sequences). DPO has no pairs for other "
            "latents: condition them (pyro.poutine.condition), use uncertainty='mean' or 'marginal' for a learned "
            "reward (not 'mixture', which samples a draw index), or train with objective='reverse'")
    return next(iter(seq.items()))


def prepare_pairs(model: Callable, args: tuple, kwargs: dict, prefs: Preferences) -> PreferencePairs:
    """Check the pairs against the model's sequence site and score them under the reference π.

    A pair's context, when the preferences carry one, is the model's single positional
    argument for that pair (the prompt); without contexts every pair answers the run's ``args``.
    Every problem is a clear error here, before any training: preferences of the wrong type,
    token ids outside the LM's vocabulary, a length other than the site's ``max_new_tokens``,
    a text the reference gives probability zero (a non-EOS token after EOS).
    """
    if not isinstance(prefs, Preferences):
        raise TypeError(f"preferences must be a ppl_lm.Preferences (pairs of chosen and rejected texts), got "
                        f"{type(prefs).__name__}; build one with ppl_lm.Preferences(chosen, rejected) or "
                        "ppl_lm.Preferences.from_jsonl(path)")
    site, d = _sequence_site(model, args, kwargs)
    lm, T = d.lm, d.max_new_tokens
    if prefs.is_text:
        try:
            chosen, rejected = prefs.tokens(lm, T)
        except (ValueError, TypeError) as err:
            raise ValueError(f"the preference texts do not fit the model's LM ({err}); give pairs this LM can "
                             "encode in max_new_tokens tokens") from None
    else:
        chosen, rejected = prefs.chosen, prefs.rejected
    if chosen.shape[1] != T:
        raise ValueError(f"the pairs hold {chosen.shape[1]} tokens per text but the model's site {site!r} has "
                         f"max_new_tokens={T}: pad the pairs with EOS (id {lm.eos_id}) to {T} tokens, or set the "
                         "model's max_new_tokens to the pairs' length")
    for side, x in (("chosen", chosen), ("rejected", rejected)):
        bad = ((x < 0) | (x >= lm.vocab_size)).any(-1).nonzero()[:, 0]
        if len(bad):
            raise ValueError(f"{side} text(s) of pair(s) {bad[:5].tolist()} hold token ids outside the LM's vocabulary "
                             f"[0, {lm.vocab_size}): these pairs were made with another tokenizer; re-encode them "
                             "with this LM")
    if prefs.context is None:
        contexts, index = [tuple(args)], torch.zeros(len(prefs), dtype=torch.long)
    else:
        names = list(dict.fromkeys(prefs.context))
        contexts = [(c,) for c in names]
        index = torch.tensor([names.index(c) for c in prefs.context])
    ref_c, ref_r = torch.empty(len(prefs), dtype=torch.float64), torch.empty(len(prefs), dtype=torch.float64)
    with torch.no_grad():
        for k, ctx in enumerate(contexts):
            rows = (index == k).nonzero()[:, 0]
            ref = model_site(model, ctx, kwargs, site)[1]
            ref_c[rows] = ref.log_prob(chosen[rows]).double().cpu()
            ref_r[rows] = ref.log_prob(rejected[rows]).double().cpu()
    for side, lp in (("chosen", ref_c), ("rejected", ref_r)):
        bad = (~torch.isfinite(lp)).nonzero()[:, 0]
        if len(bad):
            raise ValueError(f"the reference LM gives the {side} text of pair(s) {bad[:5].tolist()} probability zero "
                             f"(e.g. a non-EOS token after EOS, id {lm.eos_id}): DPO's implicit reward is undefined "
                             "there; fix or drop these pairs")
    return PreferencePairs(chosen, rejected, contexts, index, ref_c, ref_r)


def model_beta(model: Callable, args: tuple, kwargs: dict) -> float:
    """The model's β: the one temperature of its reward factors (``ppl_lm.reward``,
    ``ppl_lm.learned_reward``); a clear error when it has none or several different ones."""
    with torch.no_grad():
        tr = run_model(model, args, kwargs, 1, score_latent=False).trace
    betas = {name: f.beta for name, site in tr.nodes.items()
             if site["type"] == "sample" and (f := factor_of(site)) is not None and f.kind == "reward"}
    if not betas:
        raise ValueError("objective='dpo' needs β, the temperature of the implicit reward β·log(q/π), and the model has "
                         "no reward factor to take it from: pass beta=... (e.g. beta=0.5)")
    if len(set(betas.values())) > 1:
        raise ValueError(f"the model's reward factors have different temperatures {betas}, so its β is not one "
                         "number: pass beta=... for DPO")
    return float(next(iter(betas.values())))


class DPOLoss:
    """The DPO loss on minibatches of pairs, for the SVI training loop.

    Each step draws ``batch_size`` pairs without replacement (the seeded generator of the run;
    all pairs when ``batch_size >= n``, a deterministic full-batch gradient), scores both texts
    under the guide (``log q``, differentiable) and returns the loss. :attr:`last` holds the
    step's ``dpo_loss``, ``dpo_accuracy`` (share of the batch whose implicit reward orders the
    pair as the rater did) and ``dpo_margin`` (mean implicit-reward difference, chosen minus
    rejected). The sampling estimators' draw columns are empty: DPO draws nothing from q.

    Args:
        pairs: :func:`prepare_pairs`.
        beta: the implicit reward's temperature (> 0).
        batch_size: pairs per step.
    """

    objective = "dpo"

    def __init__(self, pairs: PreferencePairs, beta: float, batch_size: int = DEFAULT_BATCH_SIZE):
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        check_int("batch_size", batch_size)
        self.pairs, self.beta, self.batch_size = pairs, float(beta), min(batch_size, len(pairs))
        self.last: dict[str, float] = {}
        self.last_draws = torch.empty(0, 4)
        self.last_betas: dict[str, float] = {}
        self.last_reward_range: dict[str, tuple[float, float]] = {}

    def batch(self) -> torch.Tensor:
        """Indices of this step's pairs."""
        n = len(self.pairs)
        if self.batch_size >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=seeding.generator("cpu"))[: self.batch_size]

    def margins(self, guide, kwargs: dict, idx: torch.Tensor) -> torch.Tensor:
        """Implicit-reward differences ``r_q(y_w) − r_q(y_l)`` of the pairs ``idx``, grouped by context
        (``[k]``, differentiable; the loss is a mean, so the order is immaterial)."""
        p = self.pairs
        parts = []
        for k, ctx in enumerate(p.contexts):
            rows = idx[p.context_index[idx] == k]
            if not len(rows):
                continue
            m = len(rows)
            y = torch.cat([p.chosen[rows], p.rejected[rows]]).to(guide.lm.device)
            _, log_q = trace_guide(guide, ctx, kwargs, 2 * m, {guide.site: y})
            log_q = log_q.double().cpu()
            parts.append(implicit_reward(log_q[:m], p.ref_chosen[rows], self.beta)
                         - implicit_reward(log_q[m:], p.ref_rejected[rows], self.beta))
        return torch.cat(parts)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The DPO loss of one minibatch; its gradient is accumulated into the guide's parameters."""
        d = self.margins(guide, kwargs, self.batch())
        loss = dpo_loss(d, torch.zeros_like(d))
        if loss.requires_grad:
            loss.backward()
        d = d.detach()
        loss = loss.detach()
        self.last = {"dpo_loss": float(loss), "dpo_accuracy": float(((d > 0).double() + 0.5 * (d == 0).double()).mean()),
                     "dpo_margin": float(d.mean())}
        return float(loss)


def exact_dpo_optimum(log_prior: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, beta: float, *,
                      tol: float = 1e-10, max_iter: int = 500) -> torch.Tensor:
    """The minimiser of the DPO loss over every distribution on an enumerated support: ``log q`` ``[M]``.

    Args:
        log_prior: ``log π`` of the ``M`` texts of the support.
        chosen, rejected: each pair's index into the support ``[n]``.
        beta: the implicit reward's temperature.

    Over all distributions the loss depends on ``h = log q − log π`` only through differences
    on the texts seen in pairs, so the optimum is ``q ∝ π·e^{r̂/β}`` with r̂ the maximum-
    likelihood Bradley–Terry reward (one value per seen text; Newton's method on the convex
    loss). Texts in no pair get ``h = 0`` and r̂ is centred to mean 0 over the seen texts: the
    point plain gradient descent on the sequence log-probabilities reaches from q = π (there
    both quantities stay put). Every other spread of mass onto unseen texts has the same loss.

    Raises:
        ValueError: no finite minimiser: the win graph of the seen texts is not strongly
            connected (some set of texts never loses to the rest).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    log_prior = torch.as_tensor(log_prior, dtype=torch.float64)
    chosen, rejected = torch.as_tensor(chosen).long(), torch.as_tensor(rejected).long()
    seen = torch.unique(torch.cat([chosen, rejected]))
    where = torch.full((len(log_prior),), -1, dtype=torch.long)
    where[seen] = torch.arange(len(seen))
    w, lo = where[chosen], where[rejected]
    k = len(seen)
    graph = coo_matrix((torch.ones(len(w)).numpy(), (lo.numpy(), w.numpy())), shape=(k, k))  # loser -> winner
    ncomp, _ = connected_components(graph, directed=True, connection="strong")
    if ncomp > 1:
        raise ValueError(f"the DPO loss has no minimum on these pairs: the {k} texts seen in pairs fall into {ncomp} "
                         "groups of which some never lose to the rest, so their implicit reward grows without bound")
    r = torch.zeros(k, dtype=torch.float64)
    A = torch.zeros(len(w), k, dtype=torch.float64)
    A[torch.arange(len(w)), w] += 1.0
    A[torch.arange(len(w)), lo] -= 1.0
    n = len(w)
    for _ in range(max_iter):
        z = A @ r
        p = torch.sigmoid(-z)  # d/dz of −log σ(z) is −σ(−z)
        grad = -(A.T @ p) / n
        H = (A.T * (p * (1 - p))) @ A / n + torch.ones(k, k, dtype=torch.float64) / k  # fixes the mean (Laplacian)
        step = torch.linalg.solve(H, grad + r.mean())
        r = r - step
        if float(step.abs().max()) < tol:
            break
    r = r - r.mean()
    h = torch.zeros(len(log_prior), dtype=torch.float64)
    h[seen] = r / beta
    return torch.log_softmax(log_prior + h, 0)
