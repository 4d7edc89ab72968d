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

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable, Sequence

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from .distribution import SequenceDistribution
from .lm import LanguageModel, LMState, MarkovLM, TransformersLM

__all__ = ["SequenceGuide", "PositionalMarkovLM", "LoraLM", "make_guide", "model_site", "GUIDE_KINDS"]

GUIDE_KINDS = ("full", "lora")

_names = itertools.count()


# -- finding the model's sequence site ---------------------------------------------------------
class _Found(Exception):
    def __init__(self, name, fn):
        super().__init__(name)
        self.name, self.fn = name, fn


class _SiteCapture(poutine.messenger.Messenger):
    """Stops the model at its sequence site and reports the site's distribution."""

    def __init__(self, site: str | None):
        super().__init__()
        self.site = site

    def _pyro_sample(self, msg):
        if msg["is_observed"]:
            return
        base = _base(msg["fn"])
        if (self.site is None and base is not None) or msg["name"] == self.site:
            if base is None:
                raise TypeError(f"site {msg['name']!r} is not an lm.sequence(...) site; a sequence guide cannot sample it")
            raise _Found(msg["name"], base)
        raise ValueError(
            f"the model samples the latent site {msg['name']!r} before its sequence site; a sequence "
            "guide covers one lm.sequence(...) site only. Condition the other sites (poutine.condition) "
            "or pass them as arguments"
        )


def _base(fn):
    while not isinstance(fn, SequenceDistribution) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn if isinstance(fn, SequenceDistribution) else None


def model_site(model: Callable, args: tuple = (), kwargs: dict | None = None,
               site: str | None = None) -> tuple[str, SequenceDistribution]:
    """The name and distribution of ``model``'s sequence site for these arguments.

    Runs the model only up to that site (nothing is sampled, no LM call is made), hidden from
    any enclosing Pyro handler.
    """
    kwargs = kwargs or {}
    with poutine.block():
        try:
            with _SiteCapture(site):
                model(*args, **kwargs)
        except _Found as found:
            return found.name, found.fn
    what = "a latent lm.sequence(...) site" if site is None else f"the latent site {site!r}"
    raise ValueError(f"the model has no {what}")


# -- guide language models ---------------------------------------------------------------------
class PositionalMarkovLM(LanguageModel):
    """A Markov LM whose transitions depend on the position: the "full" guide of a MarkovLM.

    ``P(x_0) = softmax(init_logits)`` after an empty prompt, ``softmax(trans_logits[0, last])``
    after a prompt ending in ``last``; ``P(x_t | x_{t-1}) = softmax(trans_logits[t, x_{t-1}])``.
    Positions count new tokens, so the same guide serves every prompt. Both tensors are
    ``nn.Parameter``\\ s of :attr:`module`.
    """

    def __init__(self, prior: MarkovLM, max_new_tokens: int):
        self.prior = prior
        self.vocab_size, self.eos_id, self.vocab = prior.vocab_size, prior.eos_id, prior.vocab
        self.max_new_tokens = max_new_tokens
        self.module = nn.Module()
        self.module.init_logits = nn.Parameter(prior.init_logits.detach().clone())
        self.module.trans_logits = nn.Parameter(
            prior.trans_logits.detach().clone().expand(max_new_tokens, -1, -1).contiguous())

    def is_trainable(self) -> bool:
        return True

    def encode(self, text):
        return self.prior.encode(text)

    def decode(self, ids):
        return self.prior.decode(ids)

    def decode_token(self, token_id):
        return self.prior.decode_token(token_id)

    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"this guide was built for max_new_tokens <= {self.max_new_tokens}, asked for "
                f"{max_new_tokens}; build a new guide for longer sequences")

    def _row(self, pos: int, last: torch.Tensor | None, B: int) -> torch.Tensor:
        if last is None:
            return torch.log_softmax(self.module.init_logits, -1).expand(B, -1)
        return torch.log_softmax(self.module.trans_logits[pos][last], -1)

    def start(self, prompt, batch_size):
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        if prompt.shape[-1] == 0:
            return LMState(self._row(0, None, batch_size), (None, 0), 0)
        last = prompt[..., -1].expand(batch_size) if prompt.dim() == 1 else prompt[:, -1]
        return LMState(self._row(0, last, batch_size), (last, 0), prompt.shape[-1])

    def extend(self, state, tokens):
        pos = state.data[1] + 1
        if pos >= self.max_new_tokens:
            raise ValueError(f"this guide has no transitions beyond position {self.max_new_tokens - 1}")
        return LMState(self._row(pos, tokens, tokens.shape[0]), (tokens, pos), state.length + 1)

    def reorder(self, state, index):
        last, pos = state.data
        return LMState(state.logprobs[index], (None if last is None else last[index], pos), state.length)


class LoraLM(LanguageModel):
    """The guide side of a LoRA-adapted :class:`TransformersLM`: the same network, adapter on.

    peft injects the adapter layers into the prior's network in place (one copy of the
    weights). The adapter is off by default, so the prior computes exactly what it computed
    before injection; every network call of this LM (``start``, ``extend``,
    ``token_logprobs``) switches it on for its own duration.
    """

    def __init__(self, base: TransformersLM, r: int = 8, alpha: float = 16,
                 target_modules: Sequence[str] | str | None = None, dropout: float = 0.0):
        try:
            from peft import LoraConfig, inject_adapter_in_model
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError as err:  # pragma: no cover - peft is a dependency
            raise ImportError("guide='lora' needs peft: pip install peft") from err
        if not isinstance(base, TransformersLM):
            raise TypeError(f"LoRA needs a TransformersLM, got {type(base).__name__}; use guide='full'")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"lora_r must be a positive integer, got {r!r}")
        if target_modules is None:
            target_modules = ["q_proj", "v_proj"]
        self.base = base
        net = base.model
        existing = getattr(net, "peft_config", {}) or {}
        self.adapter = f"ppl_lm_{len(existing)}"
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            bias="none")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(config, net, adapter_name=self.adapter)
        self._layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        if not self._layers:
            raise ValueError(f"no module of the network matches target_modules={target_modules!r}")
        for layer in self._layers:
            if not hasattr(layer, "_disable_adapters") or not hasattr(layer, "_active_adapter"):
                raise RuntimeError("this peft version keeps adapter state differently; ppl-lm needs peft>=0.13")
        self._set(None)  # off: the prior is the original network
        self.params = {n: p for n, p in net.named_parameters() if f".{self.adapter}." in n}
        for p in self.params.values():
            p.requires_grad_(True)
        self.module = nn.ParameterDict({n.replace(f".{self.adapter}.", ".").replace(".", "__"): p
                                        for n, p in self.params.items()})
        self.vocab_size, self.eos_id = base.vocab_size, base.eos_id
        self.max_context, self.tokenizer, self.vocab = base.max_context, base.tokenizer, base.vocab

    def _set(self, adapter: str | None):
        # peft's public toggles (enable_adapters / set_adapter) also flip requires_grad of the
        # adapter weights, which would drop the gradient of a graph built while the adapter was on
        # (the score-function loss is differentiated after the prior has run with it off). So the
        # two flags that decide the forward pass are set directly.
        for layer in self._layers:
            if adapter is None:
                layer._disable_adapters = True
            else:
                layer._active_adapter = [adapter] if adapter in layer.lora_A else []
                layer._disable_adapters = False

    @contextlib.contextmanager
    def active(self):
        """Switch this adapter on for the duration of the block (nestable)."""
        saved = [(layer._disable_adapters, list(layer.active_adapters)) for layer in self._layers]
        self._set(self.adapter)
        try:
            yield
        finally:
            for layer, (off, act) in zip(self._layers, saved):
                layer._active_adapter, layer._disable_adapters = act, off

    @property
    def device(self):  # type: ignore[override]
        return self.base.device

    def is_trainable(self) -> bool:
        return True

    def encode(self, text):
        return self.base.encode(text)

    def decode(self, ids):
        return self.base.decode(ids)

    def decode_token(self, token_id):
        return self.base.decode_token(token_id)

    def token_texts(self):
        return self.base.token_texts()

    def start(self, prompt, batch_size):
        with self.active():
            return self.base.start(prompt, batch_size)

    def extend(self, state, tokens):
        with self.active():
            return self.base.extend(state, tokens)

    def reorder(self, state, index):
        return self.base.reorder(state, index)

    def token_logprobs(self, prompt, tokens):
        with self.active():
            return self.base.token_logprobs(prompt, tokens)


def _full_transformer(prior: TransformersLM) -> TransformersLM:
    net = copy.deepcopy(prior.model)
    for p in net.parameters():
        p.requires_grad_(True)
    emb = net.get_input_embeddings()
    if getattr(emb, "padding_idx", None) is not None:
        # nn.Embedding never updates its padding row; when the pad id is also BOS (as in the tiny
        # test transformers) the first-token distribution would be frozen.
        emb.padding_idx = None
    lm = TransformersLM(net, prior.tokenizer, eos_id=prior.eos_id, bos_id=prior.bos_id, vocab=prior.vocab)
    lm.module = net
    return lm


# -- the guide ---------------------------------------------------------------------------------
class SequenceGuide:
    """A Pyro guide: samples the model's sequence site from a trainable LM, same context.

    Call it with the model's arguments (inside the particle plate, as SVI and importance
    sampling do). Attributes: ``lm`` (the guide's :class:`LanguageModel`), ``site`` (the site
    name), ``module`` (the ``nn.Module`` holding exactly the trainable parameters), ``kind``.

    >>> import torch, pyro, ppl_lm
    >>> from ppl_lm.guides import make_guide
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
        return pyro.sample(self.site, self.lm.sequence(d.prompt, d.max_new_tokens))

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
            (default ``["q_proj", "v_proj"]``; ``"all-linear"`` for every linear layer but the head).
        seed: seeds the random initialisation of LoRA's A matrices (B starts at zero, so the
            guide starts equal to the prior whatever the seed).
        **kwargs: the model's keyword arguments.
    """
    if kind not in GUIDE_KINDS:
        raise ValueError(f"unknown guide kind {kind!r}; choose one of {', '.join(GUIDE_KINDS)} or pass a guide object")
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
        lm = _full_transformer(prior)
        module = lm.module
    else:
        raise ValueError(f"no 'full' guide for a {type(prior).__name__}; pass a guide object")
    return SequenceGuide(model, lm, site, module, kind, d.max_new_tokens)
