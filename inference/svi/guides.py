"""Trainable guides: the LM with trainable weights, sampling the model's own sequence site.

A guide (Pyro's variational family) is a callable with the model's signature. Here it finds
the model's latent ``lm.sequence(prompt, T)`` site for the given arguments (running the model
only up to that site), and samples the same site name from ``guide.lm.sequence(prompt, T)``:
the same context, so one trained guide serves many contexts (amortisation). ``guide.lm`` is an
ordinary :class:`~ppl_lm.lm.LanguageModel` (``start`` / ``extend`` / ``reorder``), so the trained
guide is also a token proposal for importance sampling and SMC.

Kinds (:func:`make_guide`):

- ``"full"``: every weight trainable. For a :class:`~ppl_lm.lm.MarkovLM` prior the guide is a
  :class:`PositionalMarkovLM` (one transition matrix per position), so the exact posterior of
  any condition that factorises over (position, previous token, token) is representable. For a
  :class:`~ppl_lm.lm.TransformersLM` prior it is a trainable copy of the network.
- ``"lora"``: LoRA adapters (peft) injected into the prior's own network: ONE copy of the
  weights in memory. The adapter is *off* by default, so the prior (and everything else that
  calls the network) computes exactly what it computed before; only the guide's calls switch it
  on (:class:`LoraLM`).
"""


from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pyro
import torch
from torch import nn

from ppl_lm.distribution import SequenceDistribution
from ppl_lm.inference._runtime import first_latent_site, latent_sites, sequence_base, sequence_sites
from ppl_lm.lm import LanguageModel, LoraLM, MarkovLM, PositionalMarkovLM, TransformersLM
from ppl_lm.lm.lora import full_transformer

__all__ = ["GUIDE_KINDS", "SequenceGuide", "make_guide", "model_site"]

GUIDE_KINDS = ("full", "lora")

_names = itertools.count()


# -- finding the model's sequence site ---------------------------------------------------------
def model_site(model: Callable, args: tuple = (), kwargs: dict | None = None,
               site: str | None = None) -> tuple[str, SequenceDistribution]:
    """The name and distribution of ``model``'s (first) sequence site for these arguments.

    Runs the model only up to that site (``poutine.escape``: nothing is sampled, no LM call is
    made), hidden from any enclosing Pyro handler.
    """
    msg = first_latent_site(model, args, kwargs or {}, site)
    if msg is None:
        what = "a latent lm.sequence(...) site" if site is None else f"the latent site {site!r}"
        raise ValueError(f"the model has no {what}")
    base = sequence_base(msg["fn"])
    if base is None:
        if site is not None:
            raise TypeError(f"site {msg['name']!r} is not an lm.sequence(...) site; a sequence guide cannot sample it")
        seq = sequence_sites(latent_sites(model, args, kwargs or {}, placeholder=True))
        if not seq:
            raise ValueError("the model has no latent lm.sequence(...) site")
        return next(iter(seq.items()))
    return msg["name"], base


# -- the guide ---------------------------------------------------------------------------------
class SequenceGuide:
    """A Pyro guide: samples the model's sequence site from a trainable LM, same context.

    Call it with the model's arguments (inside the particle plate, as SVI and importance
    sampling do). Attributes: ``lm`` (the guide's :class:`LanguageModel`), ``site`` (the site
    name), ``module`` (the ``nn.Module`` holding exactly the trainable parameters), ``kind``.

    >>> import torch, pyro, ppl_lm
    >>> from ppl_lm.inference.svi.guides import make_guide
    >>> lm = ppl_lm.MarkovLM.random(4, seed=0)
    >>> def model(prompt):
    ...     x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=3))
    ...     ppl_lm.reward("r", (x == 2).float().sum(-1), beta=1.0)
    >>> guide = make_guide(model, [1], kind="full")
    >>> with pyro.plate("particles", 5):
    ...     guide([1]).shape
    torch.Size([5, 3])
    """

    def __init__(self, model: Callable, lm: LanguageModel, site: str, module: nn.Module, kind: str,
                 max_new_tokens: int):
        self.model, self.lm, self.site, self.module, self.kind = model, lm, site, module, kind
        self.max_new_tokens = max_new_tokens
        self.name = f"ppl_lm_guide_{next(_names)}"

    def __call__(self, *args, **kwargs):
        for p in self.module.parameters():
            # peft flips requires_grad of older adapters when a new one is injected into the
            # same network; pyro.module would then silently skip them.
            if not p.requires_grad:
                p.requires_grad_(True)
        pyro.module(self.name, self.module)
        _, d = model_site(self.model, args, kwargs, self.site)
        return pyro.sample(self.site, d.with_lm(self.lm))

    def parameters(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by stable name (independent of the guide's Pyro name)."""
        return dict(self.module.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.parameters()
        if set(state) != set(params):
            raise ValueError("the saved guide has different parameters than this guide")
        with torch.no_grad():
            for k, p in params.items():
                if p.shape != state[k].shape:
                    raise ValueError(f"guide parameter {k}: saved shape {tuple(state[k].shape)} != {tuple(p.shape)}")
                p.copy_(state[k])

    def __repr__(self):
        n = sum(p.numel() for p in self.module.parameters())
        return f"SequenceGuide(kind={self.kind!r}, site={self.site!r}, lm={type(self.lm).__name__}, params={n})"


def make_guide(model: Callable, *args, kind: str = "full", lora_r: int = 8, lora_alpha: float = 16,
               lora_targets: Sequence[str] | str | None = None, seed: int = 0, **kwargs) -> SequenceGuide:
    """Build a trainable guide for ``model`` (called with ``*args, **kwargs`` to find its site).

    Args:
        kind: ``"full"`` (every weight trainable; a positional Markov guide for a MarkovLM, a
            trainable copy for a transformer) or ``"lora"`` (LoRA adapters on the prior's own
            network; TransformersLM only). Both start equal to the prior.
        lora_r, lora_alpha, lora_targets: LoRA rank, scale numerator and target module names
            (default ``None``: the attention projections found from the architecture, see
            :func:`ppl_lm.lm.lora.lora_targets`; ``"all-linear"`` for every linear layer but the head).
        seed: seeds the random initialisation of LoRA's A matrices (B starts at zero, so the
            guide starts equal to the prior whatever the seed).
        **kwargs: the model's keyword arguments.
    """
    if kind not in GUIDE_KINDS:
        raise ValueError(f"unknown guide kind {kind!r}; choose one of {', '.join(GUIDE_KINDS)} or pass a guide object")
    sites = latent_sites(model, args, kwargs, placeholder=True)
    if len(sites) > 1 or not sequence_sites(sites):  # composed, or every text observed: a joint guide
        from ppl_lm.inference.svi.joint import make_joint_guide

        return make_joint_guide(model, args, kwargs, kind=kind, lora_r=lora_r, lora_alpha=lora_alpha,
                                lora_targets=lora_targets, seed=seed)
    site, d = model_site(model, args, kwargs)
    prior = d.lm
    if kind == "lora":
        if not isinstance(prior, TransformersLM):
            raise ValueError(f"guide='lora' needs a TransformersLM prior, got {type(prior).__name__}; use guide='full'")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = LoraLM(prior, r=lora_r, alpha=lora_alpha, target_modules=lora_targets)
        module = lm.module
    elif isinstance(prior, MarkovLM):
        lm = PositionalMarkovLM(prior, d.max_new_tokens)
        module = lm.module
    elif isinstance(prior, TransformersLM):
        lm = full_transformer(prior)
        module = lm.module
    else:
        raise ValueError(f"no 'full' guide for a {type(prior).__name__}; pass a guide object")
    return SequenceGuide(model, lm, site, module, kind, d.max_new_tokens)

