"""Where one SVI step's time goes: sampling, the prior's scoring pass, the guide's pass, backward.

The setting of ``svi_vs_trl.py``: SmolLM2-135M, LoRA r=8 on q_proj/v_proj, 8 particles, 12 new
tokens, VADER sentiment reward, β = 0.25, Pyro ``SVI`` with ``RLOO_ELBO`` and ``ClippedAdam``.
Phases are timed by wrapping the LM calls: ``sample`` (the guide's KV-cached ancestral
sampling, no grad), ``prior pass`` (``TransformersLM.token_logprobs`` with the adapter off, no
grad), ``guide pass`` (the same with the adapter on, differentiable), ``backward``; ``other`` is
the rest of the step (Pyro tracing and replay, the reward, the ELBO terms, Adam).

Medians per phase over ``--repeats`` steps, after one warm-up step. (Until 2026-12-03 it also ran
the implementation before 2026-11-26, a one-pass scorer and an exponential-race sampler, side by side;
that variant patched a private sampler the library no longer has; its result, 1.25x a step, is in
``RESULTS.md``.)

    python benchmarks/svi_profile.py --threads 1          # 6 steps
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


class PhaseClock:
    """Wraps the LM entry points and ``Tensor.backward`` to time the phases of a step."""

    def __init__(self, lm, layers):
        from ppl_lm import lm as lm_module

        self.mod, self.layers = lm_module, layers
        self.times: dict[str, float] = collections.defaultdict(float)
        clock = self
        sample, score = lm_module.LanguageModel.sample, lm_module.TransformersLM.token_logprobs
        backward = torch.Tensor.backward

        def timed_sample(*a, **k):
            with clock.timed("sample"):
                return sample(*a, **k)

        def timed_score(lm_self, prompt, tokens):
            on = any(not layer._disable_adapters for layer in clock.layers)
            with clock.timed("guide pass" if on else "prior pass"):
                return score(lm_self, prompt, tokens)

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
    runs = collections.defaultdict(list)
    with ppl_lm.seeding.seeded(args.seed):
        for i in range(args.repeats + 1):
            clock.times.clear()
            t0 = time.perf_counter()
            svi.step(PROMPT)
            total = time.perf_counter() - t0
            if i == 0:
                continue  # warm-up
            runs["step"].append(total)
            runs["other"].append(total - sum(clock.times.values()))
            for k, t in clock.times.items():
                runs[k].append(t)
    med = {k: statistics.median(runs[k]) if runs[k] else 0.0 for k in PHASES}
    print(f"{'phase':12s} {'median s':>9s} {'share':>6s}   (over {args.repeats} steps)")
    for k in PHASES:
        print(f"{k:12s} {med[k]:9.3f} {med[k] / med['step']:6.1%}")
    _bench.emit("svi_profile", {"args": vars(args), "phases": med})


if __name__ == "__main__":
    main()
