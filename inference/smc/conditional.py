"""Conditional SMC: an upper bound on log Z from exact posterior draws (Zhao et al., 2024, §5).

SMC's log Ẑ is a stochastic *lower* bound: E[log Ẑ] ≤ log Z (Jensen, Ẑ unbiased). Run the same
SMC with one particle of each replicate held to an exact draw x* ~ π′ (the *reference*: its
tokens are never sampled and it always survives resampling, while the other N − 1 particles
resample from all N, multinomially) and its log Ẑ is a stochastic *upper* bound:
E[log Ẑ_CSMC] ≥ log Z. The CSMC law of the particles is the extended target Ẑ/Z · q_SMC, so
E_CSMC[log Ẑ] − log Z = KL(Ẑ/Z · q_SMC ‖ q_SMC) ≥ 0; the gap between the two bounds is the sum of
the two KLs between the SMC proposal and the extended target, which shrinks as N grows. With one
particle it is reverse importance sampling (the EUBO, E_π′[log w]).

The reference is row 0 of each replicate; every other part of the sweep (twists, masks, the
proposal LM, ESS-triggered resampling) is SMC's own (:class:`~.sweep.Sweep`), so the bound is
that of the run it brackets. Resampling is multinomial whatever the run used: the conditional
law of the other schemes is not this one, and the bound holds for any SMC (it brackets the
multinomial run's log Z, which has the same expectation to first order).

Each reference is one replicate, and replicates are batched up to ``chunk_size`` rows.
"""

from __future__ import annotations

import math

import torch
from ppl_lm.inference._runtime import check_has_latent, latent_sites, observed_sequences, row_cache, sequence_sites

from ppl_lm import seeding as _random

from .driver import build_stages
from .islands import default_chunk_size, sweep_plan
from .sweep import Sweep, SweepSpec

__all__ = ["ConditionalSweep", "log_evidence_replicates"]


class ConditionalSweep(Sweep):
    """A :class:`Sweep` whose row 0 of each replicate is held to a reference draw.

    ``reference`` maps each sequence site to the reference tokens ``[R, T]`` of the sweep's
    ``R`` replicates (EOS-padded).
    """

    def __init__(self, spec: SweepSpec, reference: dict[str, torch.Tensor]):
        if spec.resampling != "multinomial":
            raise ValueError("conditional SMC resamples multinomially (resampling='multinomial')")
        super().__init__(spec)
        self.reference = reference
        self.rows = torch.arange(spec.R) * spec.N  # the reference row of each replicate

    def _choose(self, logq, allowed, gen, t):
        tok, log_mass = super()._choose(logq, allowed, gen, t)
        st = self.state
        ref = self.reference[st.name][:, t].to(tok.device)
        rows = self.rows.to(tok.device)
        live = ~st.site.done[self.rows].to(tok.device)
        ok = torch.isfinite(logq[rows, ref])
        if allowed is not None:
            ok = ok & allowed.expand_as(logq)[rows, ref]
        bad = live & ~ok
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"reference draw {self.spec.replicates[r]} has token {int(ref[r])} at position {t} of "
                             f"site {st.name!r}, which the model's token mask (or the proposal) forbids: it is not a "
                             "draw from the conditional. Pass exact draws (ppl_lm.exact_draws)")
        tok[rows] = ref
        return tok, log_mass

    def _check_alive(self, where: str) -> None:
        # Called before every resampling, which resets the weights: a dead reference is caught here.
        _check_reference(self.reference_log_w(), self.spec.replicates)
        super()._check_alive(where)

    def _ancestors(self, probs: torch.Tensor, need: torch.Tensor, gen) -> torch.Tensor:
        index = super()._ancestors(probs, need, gen)
        index[:, 0] = 0  # the reference survives; the other N − 1 resample from all N
        return index

    def reference_log_w(self) -> torch.Tensor:
        """The reference rows' final log-weights ``[R]`` (−inf: the reference breaks the condition)."""
        return self.state.log_w[self.rows]


def log_evidence_replicates(model, *args, model_kwargs: dict | None = None, num_particles: int = 256,
                            reference: dict[str, torch.Tensor] | None = None, num_replicates: int | None = None,
                            ess_threshold: float = 0.5, guide=None, proposal=None, twist=None,
                            observed: str = "prefix",
                            chunk_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """log Ẑ of independent SMC replicates ``[R]`` (float64): conditional on one reference draw each
    (stochastic upper bounds, E[log Ẑ] ≥ log Z) given ``reference``, plain multinomial SMC
    (stochastic lower bounds) without.

    Args:
        reference: each latent sequence site's exact draws ``[R, T]`` (the model's every latent
            site must be a sequence site: other latents have no reference value here).
        num_replicates: ``R`` without ``reference``.
        num_particles, ess_threshold, guide, proposal, twist, observed, chunk_size: as in
            :func:`ppl_lm.inference.smc.run`;
            a replicate must fit in ``chunk_size`` rows (no islands).

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.constraint("starts_b", x[..., 0] == 1, prefix_closed=True)
    >>> ref = {"x": torch.tensor([[1, 0]] * 200)}  # every draw of the conditional starts with b
    >>> upper = log_evidence_replicates(model, num_particles=4, reference=ref).mean()
    >>> lower = log_evidence_replicates(model, num_particles=4, num_replicates=200).mean()
    >>> bool(lower < -1.0986 < upper)  # log(1/3)
    True
    """
    kwargs = dict(model_kwargs or {})
    with _random.seeded(seed), torch.no_grad(), row_cache():
        sites = latent_sites(model, args, kwargs, placeholder=True)
        check_has_latent(sites, "smc")
        seq = sequence_sites(sites)
        R = _replicates(sites, seq, reference, num_replicates)
        if chunk_size is None:
            sized = [*seq.values(), *observed_sequences(model, args, kwargs).values()]
            chunk_size = min(default_chunk_size(d) for d in sized)
        if num_particles > chunk_size:
            raise ValueError(f"conditional SMC runs each replicate in one sweep, so num_particles={num_particles} "
                             f"must be at most chunk_size={chunk_size}; use fewer particles or a larger chunk_size")
        stages, _, _ = build_stages(model, args, kwargs, seq, guide, proposal, twist)
        out = torch.empty(R, dtype=torch.float64)
        for n, reps in sweep_plan(num_particles, R, chunk_size):
            spec = SweepSpec(model, args, kwargs, stages, n, reps, ess_threshold, "multinomial", observed)
            if reference is None:
                sweep = Sweep(spec)
            else:
                ref = {k: _padded(reference[k][reps], seq[k]) for k in seq}
                sweep = ConditionalSweep(spec, ref)
            sweep.run(False, sum(d.max_new_tokens for d in seq.values()))
            out[reps] = sweep.result().log_z
            del sweep  # free its KV cache before the next sweep allocates one
    return out


def _replicates(sites: dict, seq: dict, reference, num_replicates) -> int:
    if not seq:
        raise ValueError("conditional SMC advances the tokens of a latent lm.sequence(...) site; this model has none")
    if reference is None:
        if num_replicates is None:
            raise ValueError("give reference= (exact draws) or num_replicates=")
        return int(num_replicates)
    others = [k for k in sites if k not in seq]
    if others:
        raise ValueError(f"conditional SMC holds every latent site of a reference draw, and the model's latent "
                         f"site(s) {others} are not sequence sites SMC advances; bound log Z of this model with "
                         "an importance run (reverse importance sampling takes any latent site)")
    missing = [k for k in seq if k not in reference]
    if missing:
        raise ValueError(f"the reference draws have no value for sequence site(s) {missing}")
    sizes = {len(reference[k]) for k in seq}
    if len(sizes) != 1:
        raise ValueError(f"the reference draws of the sites have different counts {sorted(sizes)}")
    return sizes.pop()


def _padded(tokens: torch.Tensor, d) -> torch.Tensor:
    """Reference tokens ``[R, T]`` of a site with ``max_new_tokens = T`` (EOS-padded or cut at T)."""
    tokens = torch.as_tensor(tokens).long().reshape(len(tokens), -1)
    T = d.max_new_tokens
    if tokens.shape[1] < T:
        pad = torch.full((len(tokens), T - tokens.shape[1]), d.lm.eos_id, dtype=torch.long)
        tokens = torch.cat([tokens, pad], 1)
    elif tokens.shape[1] > T and bool((tokens[:, T:] != d.lm.eos_id).any()):
        raise ValueError(f"reference draws are longer than the site's max_new_tokens={T}")
    return tokens[:, :T]


def _check_reference(log_w: torch.Tensor, reps: list[int]) -> None:
    dead = ~torch.isfinite(log_w)
    if bool(dead.any()):
        r = reps[int(dead.nonzero()[0, 0])]
        raise ValueError(f"reference draw {r} has zero probability under the conditional (a condition rejects it): "
                         "it is not an exact draw. Pass exact draws (ppl_lm.exact_draws)")
    if bool(torch.isnan(log_w).any()) or bool((log_w == math.inf).any()):
        raise FloatingPointError("NaN or +inf in the reference weights")
