"""SVI on the real model: SmolLM2 fine-tuned toward positive sentiment with a KL penalty.

The model is "prior π = SmolLM2, likelihood exp(r/β)" with r = VADER compound sentiment of the
continuation of ``--prompt``; the guide is SmolLM2 with LoRA adapters (r=8, α=16, q_proj/v_proj,
one copy of the weights: the prior is the same network with the adapter off). For each β the
script trains ``--steps`` steps of ``method="svi"`` and prints

- ELBO, E_q[r] and KL(q‖π) at the start and the end of training (means of the per-step
  estimates over the first / last ``--window`` steps; ELBO·β = E_q[r] − β·KL(q‖π));
- the mean reward of ``--eval-samples`` fresh guide samples vs as many prior samples, with
  standard errors, and KL(q‖π) on the guide samples;
- seconds per training step, and the importance-sampling correction's log Z and ESS.

    python benchmarks/svi_sentiment.py                       # 100 steps, β in {0.1, 1}
    python benchmarks/svi_sentiment.py --steps 50 --particles 8 --tokens 12
    python benchmarks/svi_sentiment.py --smoke               # 2 steps, 4 tokens: checks it runs
"""

from __future__ import annotations

import math
import os
import sys
import time

import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

import ppl_lm  # noqa: E402


def sentiment_model(lm, beta: float, T: int):
    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.reward("sentiment", ppl_lm.rewards.sentiment(lm, x), beta=beta)
        return x

    return model


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(len(x))) if len(x) > 1 else float("nan")


@torch.no_grad()
def evaluate(prior, guide_lm, prompt: str, T: int, n: int, seed: int) -> dict:
    """Fresh samples: mean reward of guide vs prior, KL(q‖π) on the guide's samples."""
    with ppl_lm.seeding.seeded(seed):
        gx, glp = guide_lm.sample(prompt, n, T, generator=ppl_lm.seeding.generator(guide_lm.device))
        px, _ = prior.sample(prompt, n, T, generator=ppl_lm.seeding.generator(prior.device))
    log_q = glp.sum(-1)
    log_p = prior.score(prompt, gx)
    r_guide = ppl_lm.rewards.sentiment(prior, gx)
    r_prior = ppl_lm.rewards.sentiment(prior, px)
    return {
        "reward_guide": mean_se(r_guide), "reward_prior": mean_se(r_prior),
        "kl_prior": mean_se(log_q - log_p),
        "examples_guide": ppl_lm.rewards.texts(prior, gx[:3]), "examples_prior": ppl_lm.rewards.texts(prior, px[:3]),
    }


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--prompt", default="The movie was")
    p.add_argument("--steps", type=int, default=100, help="SVI steps per β")
    p.add_argument("--particles", type=int, default=8, help="guide samples per step")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per sample")
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--is-samples", type=int, default=64, help="importance-sampling correction draws")
    p.add_argument("--window", type=int, default=10, help="steps averaged for the start/end numbers")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.tokens, args.particles, args.eval_samples, args.is_samples = 2, 4, 4, 8, 8
        args.window = 1
    _bench.setup(args)

    t0 = time.perf_counter()
    lm = _bench.smollm2(args)
    load_s = time.perf_counter() - t0
    print(f"SmolLM2 loaded in {load_s:.1f}s; prompt {args.prompt!r}, {args.tokens} tokens, "
          f"{args.particles} particles, {args.steps} steps, lr {args.lr}, LoRA r={args.lora_r}", flush=True)

    rows = []
    for beta in args.betas:
        model = sentiment_model(lm, beta, args.tokens)
        post = ppl_lm.infer(model, args.prompt, method="svi", guide="lora", num_steps=args.steps,
                            num_particles=args.particles, lr=args.lr, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                            num_samples=args.is_samples, progress=not args.no_progress, seed=args.seed)
        tr = post.info.trace
        w = max(1, min(args.window, args.steps // 2 or 1))

        keys = ("elbo", "reward:sentiment", "kl_prior")
        start = {k: float(tr[k][:w].mean()) for k in keys}
        end = {k: float(tr[k][-w:].mean()) for k in keys}
        ev = evaluate(lm, post.guide.lm, args.prompt, args.tokens, args.eval_samples, args.seed + 1)
        sec = post.info.step_seconds
        median_s = float(torch.tensor(sec[1:] if len(sec) > 1 else sec).median())
        row = {"beta": beta, "start": start, "end": end, "eval": ev,
               "seconds_per_step": post.info.seconds_per_step, "median_step_s": median_s, "steps": args.steps,
               "log_evidence": post.log_evidence, "log_evidence_se": post.log_evidence_se,
               "is_ess": post.ess, "is_samples": len(post)}
        rows.append(row)
        print(f"\nβ = {beta}: {post.info.seconds_per_step:.2f} s/step over {args.steps} steps "
              f"(median {median_s:.2f} s without the first, warm-up, step)")
        print(f"  start (first {w} steps): ELBO {start['elbo']:+.3f}  E_q[r] {start['reward:sentiment']:+.3f}  "
              f"KL(q‖π) {start['kl_prior']:.3f}")
        print(f"  end   (last {w} steps):  ELBO {end['elbo']:+.3f}  E_q[r] {end['reward:sentiment']:+.3f}  "
              f"KL(q‖π) {end['kl_prior']:.3f}")
        (rg, rgs), (rp, rps), (kl, kls) = ev["reward_guide"], ev["reward_prior"], ev["kl_prior"]
        print(f"  {args.eval_samples} fresh samples: reward guide {rg:+.3f} ± {rgs:.3f} vs prior {rp:+.3f} ± {rps:.3f}; "
              f"KL(q‖π) {kl:.3f} ± {kls:.3f}")
        print(f"  IS correction ({len(post)} guide draws): log Z {post.log_evidence:+.3f} ± "
              f"{post.log_evidence_se:.3f}, ESS {post.ess:.1f}")
        for text in ev["examples_guide"]:
            print(f"    guide: {args.prompt}{text!r}")
        for text in ev["examples_prior"]:
            print(f"    prior: {args.prompt}{text!r}")
        sys.stdout.flush()
    _bench.emit("svi_sentiment", {"args": vars(args), "load_s": load_s, "rows": rows})


if __name__ == "__main__":
    main()
