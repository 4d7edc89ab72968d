"""A guide for every latent site of a composed model: sequences, discrete and continuous latents.

The guide runs the model itself with each latent site's distribution swapped for its trainable
part, the model's factors hidden, and stops right after the last latent site (no reward is
computed in the guide). So a later site's prompt or parameters come from the guide's own earlier
draws exactly as the model computes them (``lm.sequence(prompts[w])``, ``lm.sequence(x[..., :k])``),
and the guide is amortised over them. Parts, by site:

- ``lm.sequence(...)``: the same prompts under a trainable LM. ``kind="lora"``: one LoRA adapter per
  prior network, shared by every sequence site of that LM (one copy of the weights);
  ``kind="full"``: a positional Markov table per site (MarkovLM prior), or one trainable copy per
  prior network (transformer).
- a discrete site (enumerable support, scalar values): a categorical over its support, starting
  at the prior's probabilities, not amortised (it does not depend on earlier draws).
- a continuous site: a Normal in the unconstrained space of its support (``biject_to``), mean-
  field, the family of Pyro's ``AutoNormal``, starting at the prior's mean and spread there.
  (``AutoNormal`` itself would give each particle of the vectorised plate its own parameters.)

Adam moves every parameter by about ``lr`` a step, and LoRA's default ``lr`` (2e-3) suits
adapters, not the logits or location of a latent; with ``kind="lora"`` those parameters are
stored divided by :data:`LATENT_SCALE`, so a step moves them ``LATENT_SCALE`` times further.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.transforms import biject_to
from pyro.poutine.messenger import Messenger
from torch import nn

from ppl_lm import seeding
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.inference._runtime import is_latent, latent_sites, sequence_base
from ppl_lm.inference.svi.guides import SequenceGuide
from ppl_lm.lm import MarkovLM, PositionalMarkovLM, TransformersLM
from ppl_lm.lm.lora import LoraLM, full_transformer
from ppl_lm.tokens import categorical

__all__ = ["LATENT_SCALE", "JointGuide", "OnSupport", "ScoreFunctionTransformed", "make_joint_guide"]

LATENT_SCALE = {"lora": 25.0, "full": 1.0}


class OnSupport(TorchDistribution):
    """A categorical law over the listed ``values`` (a discrete site's support), scalar events."""

    arg_constraints: dict = {}
    has_enumerate_support = True
    support = constraints.real  # the values themselves are checked in log_prob

    def __init__(self, values: torch.Tensor, logits: torch.Tensor, batch_shape=torch.Size(), validate_args=None):
        self.values, self.logits = values, logits
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return OnSupport(self.values, self.logits, batch_shape)

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        n = math.prod(shape)
        logp = torch.log_softmax(self.logits.detach(), -1).expand(n, -1)
        return self.values[categorical(logp, seeding.generator("cpu"))].reshape(shape)

    def log_prob(self, value):
        eq = torch.as_tensor(value).unsqueeze(-1) == self.values
        lp = torch.where(eq, torch.log_softmax(self.logits, -1), torch.zeros((), dtype=self.logits.dtype)).sum(-1)
        return torch.where(eq.any(-1), lp, torch.full_like(lp, -math.inf))

    def enumerate_support(self, expand=True):
        v = self.values.reshape(-1, *([1] * len(self.batch_shape)))
        return v.expand(-1, *self.batch_shape) if expand else v


class ScoreFunctionTransformed(dist.TransformedDistribution):
    """A transformed distribution sampled without reparameterisation: the guide's gradients are
    score-function ones (the model's log-density is computed without gradients), and a
    reparameterised draw would carry the parameters into the value, cancelling ∇log q."""

    has_rsample = False


class _Done(Exception):
    """Raised after the guide's last latent site: nothing after it needs to run."""


class _Swap(Messenger):
    """Swap each latent site's distribution for its guide part; stop after the last one."""

    def __init__(self, parts: dict[str, Callable], last: str):
        super().__init__()
        self.parts, self.last = parts, last

    def _process_message(self, msg):
        if not is_latent(msg):
            return
        part = self.parts.get(msg["name"])
        if part is None:
            raise ValueError(
                f"the model sampled the latent site {msg['name']!r}, which it did not sample when the guide was built "
                "(its latent sites depend on the arguments or on random draws); build the guide for these arguments, "
                "or give every run the same latent sites")
        msg["fn"] = part(msg["fn"])

    def _postprocess_message(self, msg):
        # Postprocessing runs from the outermost handler inwards: the caller's trace has already
        # recorded this site when this (innermost) handler stops the model.
        if is_latent(msg) and msg["name"] == self.last:
            raise _Done


def _hidden(msg) -> bool:
    return msg["type"] == "sample" and msg["is_observed"]


class JointGuide(SequenceGuide):
    """A Pyro guide over every latent site of ``model`` (see the module notes).

    Attributes as :class:`~ppl_lm.inference.svi.guides.SequenceGuide`'s: ``site`` (the main,
    first, sequence site; ``None`` when every sequence site is observed), ``lm`` (its guide LM,
    usable as an SMC proposal; ``None`` likewise), ``module`` (exactly
    the trainable parameters), ``kind``; ``sites`` lists every latent site it samples.
    """

    def __init__(self, model: Callable, parts: dict[str, Callable], module: nn.Module, kind: str, site: str,
                 lm, max_new_tokens: int):
        super().__init__(model, lm, site, module, kind, max_new_tokens)
        self.parts, self.sites = parts, list(parts)

    def __call__(self, *args, **kwargs):
        for p in self.module.parameters():
            if not p.requires_grad:  # see SequenceGuide.__call__ (peft flips older adapters)
                p.requires_grad_(True)
        pyro.module(self.name, self.module)
        try:
            with poutine.block(hide_fn=_hidden), _Swap(self.parts, self.sites[-1]):
                self.model(*args, **kwargs)
        except _Done:
            pass

    def __repr__(self):
        n = sum(p.numel() for p in self.module.parameters())
        return f"JointGuide(kind={self.kind!r}, sites={self.sites}, params={n})"


def _sequence_lm(d: SequenceDistribution, kind: str, shared: dict, lora: dict):
    prior = d.lm
    if kind == "lora":
        if not isinstance(prior, TransformersLM):
            raise ValueError(f"guide='lora' needs a TransformersLM prior, got {type(prior).__name__}; use guide='full'")
        if id(prior) not in shared:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(lora["seed"])
                shared[id(prior)] = LoraLM(prior, r=lora["r"], alpha=lora["alpha"], target_modules=lora["targets"])
        return shared[id(prior)]
    if isinstance(prior, MarkovLM):
        return PositionalMarkovLM(prior, d.max_new_tokens)  # one table per site: prompts and lengths differ
    if isinstance(prior, TransformersLM):
        if id(prior) not in shared:
            shared[id(prior)] = full_transformer(prior)
        return shared[id(prior)]
    raise ValueError(f"no 'full' guide for a {type(prior).__name__}; pass a guide object")


def _discrete_part(name: str, fn, module: nn.Module, key: str, scale: float):
    if fn.event_shape:
        raise ValueError(f"the discrete latent site {name!r} has vector values {tuple(fn.event_shape)}; the SVI guide "
                         "covers discrete sites with scalar values. Condition it (poutine.condition) or split it")
    values = fn.enumerate_support(expand=False).reshape(-1)
    lp = fn.log_prob(values.reshape(-1, *([1] * len(fn.batch_shape)))).reshape(len(values), -1)[:, 0]
    if not torch.isfinite(lp).any():
        raise ValueError(f"the discrete latent site {name!r} gives every value probability zero")
    start = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, -30.0)).detach().float() / scale
    module.register_parameter(key, nn.Parameter(start.clone()))
    return lambda _fn: OnSupport(values, getattr(module, key) * scale)


def _continuous_part(name: str, fn, module: nn.Module, key: str, scale: float):
    t = biject_to(fn.support)
    with torch.no_grad():
        draws = fn.sample((256,))
        u = t.inv(draws)
    event = u.shape[1 + len(fn.batch_shape):]
    u = u.reshape(-1, *event).double()
    loc, sd = u.mean(0), u.std(0).clamp_min(1e-3)
    if not (torch.isfinite(loc).all() and torch.isfinite(sd).all()):
        raise ValueError(f"the continuous latent site {name!r}: its prior draws are not finite in the unconstrained "
                         "space of its support, so the guide cannot start at the prior")
    module.register_parameter(key + "_loc", nn.Parameter((loc.float() / scale).clone()))
    module.register_parameter(key + "_log_scale", nn.Parameter((sd.log().float() / scale).clone()))

    def part(_fn):
        base = dist.Normal(getattr(module, key + "_loc") * scale, (getattr(module, key + "_log_scale") * scale).exp())
        return ScoreFunctionTransformed(base.to_event(len(event)), [t])

    return part


def make_joint_guide(model: Callable, args: tuple, kwargs: dict, *, kind: str = "full", lora_r: int = 8,
                     lora_alpha: float = 16, lora_targets: Sequence[str] | str | None = None,
                     seed: int = 0) -> JointGuide:
    """The joint guide of ``model`` for these arguments (see the module notes)."""
    sites = latent_sites(model, args, kwargs, placeholder=True)
    module, parts, shared = nn.Module(), {}, {}
    scale = LATENT_SCALE[kind]
    lora = {"r": lora_r, "alpha": lora_alpha, "targets": lora_targets, "seed": seed}
    main = None
    for i, (name, fn) in enumerate(sites.items()):
        key = f"site{i}"
        if isinstance(fn, SequenceDistribution):
            glm = _sequence_lm(fn, kind, shared, lora)
            if not any(m is glm.module for m in module.children()):
                module.add_module(key, glm.module)
            parts[name] = (lambda g: lambda f: sequence_base(f).with_lm(g))(glm)
            if main is None:
                main = (name, glm, fn.max_new_tokens)
        elif fn.has_enumerate_support:
            parts[name] = _discrete_part(name, fn, module, key + "_logits", scale)
        elif fn.support.is_discrete:
            raise ValueError(f"the discrete latent site {name!r} ({type(fn).__name__}) has no finite support to "
                             "enumerate; the SVI guide cannot cover it. Condition it or pass it as an argument")
        else:
            parts[name] = _continuous_part(name, fn, module, key, scale)
    if main is None:  # every sequence site observed: a guide over the other latents only
        main = (None, None, 0)
    return JointGuide(model, parts, module, kind, main[0], main[1], main[2])
