"""Where one SVI step's time goes: sampling, the prior's scoring pass, the guide's pass, backward.

The setting of ``svi_vs_trl.py``: SmolLM2-135M, LoRA r=8 on q_proj/v_proj, 8 particles, 12 new
tokens, VADER sentiment reward, β = 0.25, Pyro ``SVI`` with ``RLOO_ELBO`` and ``ClippedAdam``.
Phases are timed by wrapping the LM calls: ``sample`` (the guide's KV-cached ancestral
sampling, no grad), ``prior pass`` (``TransformersLM.token_logprobs`` with the adapter off, no
grad), ``guide pass`` (the same with the adapter on, differentiable), ``backward``; ``other`` is
the rest of the step (Pyro tracing and replay, the reward, the ELBO terms, Adam).

Two variants run interleaved in one process (ABBA over ``--repeats`` steps each, after a
warm-up step each), medians per phase:

- ``current``: the library as it is;
- ``one-pass`` (the implementation before 2026-11-26): every scoring pass reads the prompt
  once per row (one forward over prompt + continuation for each of the B rows, logits at
  every position) and the sampler is the exponential race (one Exp(1) draw per vocabulary
  entry per row per step).

    python benchmarks/svi_profile.py --threads 1          # 6 steps per variant
    python benchmarks/svi_profile.py --smoke              # tiny model, seconds
"""

from __future__ import annotations

import collections
import contextlib
import os
import statistics
import sys
import time

import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

PROMPT = "I watched the new movie last night and"
PHASES = ("step", "sample", "prior pass", "guide pass", "backward", "other")


def one_pass_token_logprobs(self, prompt, tokens):
    """The scoring pass before 2026-11-26: prompt + continuation, one forward per row."""
    from ppl_lm.tokens import after_eos_mask, as_prompt_tensor

    prompt = self._prompt_rows(as_prompt_tensor(prompt, self), tokens.shape[0])
    P, T = prompt.shape[-1], tokens.shape[-1]
    logits = self.model(input_ids=torch.cat([prompt, tokens], -1), use_cache=False).logits
    lp = torch.log_softmax(logits[:, P - 1 : P - 1 + T].float(), -1).gather(-1, tokens[..., None])[..., 0]
    return lp * after_eos_mask(tokens, self.eos_id).logical_not()


def exponential_race(logprobs, generator):
    """The sampler before 2026-11-26: argmax(logp − log E), E ~ Exp(1) per vocabulary entry."""
    e = torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device).exponential_(generator=generator)
    return (logprobs.float() - e.log()).argmax(-1)


class PhaseClock:
    """Wraps the LM entry points and ``Tensor.backward`` to time the phases of a step."""

    def __init__(self, lm, layers):
        from ppl_lm import lm as lm_module

        self.mod, self.layers = lm_module, layers
        self.times: dict[str, float] = collections.defaultdict(float)
        self.scorer = {"current": lm_module.TransformersLM.token_logprobs, "one-pass": one_pass_token_logprobs}
        self.sampler = {"current": lm_module._categorical, "one-pass": exponential_race}
        self.variant = "current"
        clock = self
        sample, backward = lm_module.LanguageModel.sample, torch.Tensor.backward

        def timed_sample(*a, **k):
            with clock.timed("sample"):
                return sample(*a, **k)

        def timed_score(lm_self, prompt, tokens):
            on = any(not layer._disable_adapters for layer in clock.layers)
            with clock.timed("guide pass" if on else "prior pass"):
                return clock.scorer[clock.variant](lm_self, prompt, tokens)

        def timed_backward(t, *a, **k):
            with clock.timed("backward"):
                return backward(t, *a, **k)

        lm_module.LanguageModel.sample = timed_sample
        lm_module.TransformersLM.token_logprobs = timed_score
        torch.Tensor.backward = timed_backward

    @contextlib.contextmanager
    def timed(self, key):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[key] += time.perf_counter() - t0

    def use(self, variant: str) -> None:
        self.variant = variant
        self.mod._categorical = self.sampler[variant]


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--tokens", type=int, default=12)
    args = p.parse_args(argv)
    _bench.setup(args)
    args.repeats = args.repeats or (2 if args.smoke else 6)

    from peft.tuners.tuners_utils import BaseTunerLayer
    from pyro.infer import SVI
    from pyro.optim import ClippedAdam

    import ppl_lm
    from ppl_lm import rewards
    from ppl_lm.inference.svi.elbo import RLOO_ELBO
    from ppl_lm.inference.svi.guides import make_guide

    lm = ppl_lm.tiny_char_transformer(seed=0) if args.smoke else _bench.smollm2(args)

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=args.tokens))
        ppl_lm.reward("sentiment", rewards.sentiment(lm, x), beta=0.25)
        return x

    guide = make_guide(model, PROMPT, kind="lora", seed=args.seed)
    clock = PhaseClock(lm, [m for m in lm.model.modules() if isinstance(m, BaseTunerLayer)])
    svi = SVI(model, guide, ClippedAdam({"lr": 1e-3, "clip_norm": 10.0}),
              loss=RLOO_ELBO(args.particles, relax_penalty=10.0))
    variants = ("current", "one-pass")
    runs = {v: collections.defaultdict(list) for v in variants}
    order = list(variants) + [v for r in range(args.repeats) for v in (variants if r % 2 == 0 else variants[::-1])]
    with ppl_lm.seeding.seeded(args.seed):
        for i, v in enumerate(order):
            clock.use(v)
            clock.times.clear()
            t0 = time.perf_counter()
            svi.step(PROMPT)
            total = time.perf_counter() - t0
            if i < len(variants):
                continue  # warm-up
            runs[v]["step"].append(total)
            runs[v]["other"].append(total - sum(clock.times.values()))
            for k, t in clock.times.items():
                runs[v][k].append(t)
    med = {v: {k: statistics.median(runs[v][k]) if runs[v][k] else 0.0 for k in PHASES} for v in variants}
    print(f"{'phase':12s} {'one-pass':>9s} {'current':>9s}   (median s over {args.repeats} steps each)")
    for k in PHASES:
        print(f"{k:12s} {med['one-pass'][k]:9.3f} {med['current'][k]:9.3f}")
    speedup = med["one-pass"]["step"] / med["current"]["step"]
    print(f"step: current {speedup:.2f}x faster than one-pass")
    _bench.emit("svi_profile", {"args": vars(args), "phases": med, "speedup": speedup})


if __name__ == "__main__":
    main()
