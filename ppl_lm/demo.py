"""The README's demo: SmolLM2 as a Pyro distribution, then exact conditioning on a toy LM.

Run with ``make demo`` (or ``python -m ppl_lm.demo``). Takes well under two minutes on CPU.
"""

from __future__ import annotations

import argparse
import time
import warnings

import pyro
import pyro.poutine as poutine
import torch

import ppl_lm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="Once upon a time, in a small village,")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    lm = ppl_lm.load_lm()
    print(f"Loaded the embedded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s "
          f"(vocab {lm.vocab_size}, EOS id {lm.eos_id}).\n")

    # 1. The LM is a distribution over sequences: sample continuations and their log-probs.
    d = lm.sequence(args.prompt, max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    with ppl_lm.seeding.seeded(args.seed), pyro.plate("samples", args.num_samples):
        trace = poutine.trace(lambda: pyro.sample("x", d)).get_trace()
    dt = time.perf_counter() - t0
    x = trace.nodes["x"]["value"]
    logp = trace.nodes["x"]["fn"].log_prob(x)  # the sampler's own log-probs
    rescored = lm.score(args.prompt, x)  # a fresh, single-pass scoring of the same tokens
    print(f"Prompt: {args.prompt!r}")
    print(f"{args.num_samples} continuations of {args.max_new_tokens} tokens in {dt:.2f} s:")
    for text, lp in zip(ppl_lm.rewards.texts(lm, x), logp.tolist()):
        print(f"  log π(x | prompt) = {lp:8.2f}   {text!r}")
    print(f"  sampler log-probs vs a fresh scoring pass: max |diff| = "
          f"{(logp - rescored).abs().max().item():.2e}\n")

    # 2. Conditioning the real model: "never use the letter e", by SMC with a locally
    #    constrained proposal (every particle stays admissible; weights stay exact).
    def no_e(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=args.max_new_tokens))
        ppl_lm.token_constraint("no_e", x, ppl_lm.rewards.forbid_chars(lm, "eE"))
        return x

    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16 particles are few; the ESS below says so
        post = ppl_lm.infer(no_e, args.prompt, method="smc", num_particles=16, seed=args.seed,
                            progress=False)
    print(f"SMC, condition 'no letter e', 16 particles in {time.perf_counter() - t1:.1f} s: "
          f"log Z = {post.log_evidence:.2f} (log-probability that the LM avoids 'e' on its own), "
          f"ESS = {post.ess:.1f}")
    best = torch.argsort(post.log_weights, descending=True)[:3]
    for i in best.tolist():
        print(f"  w = {post.weights[i].item():.3f}   {post.texts[i]!r}")
    print()

    # 3. Conditioning, exactly: a toy Markov LM, condition "contains the letter b".
    toy = ppl_lm.MarkovLM.random(4, eos_id=0, seed=0)

    def model():
        x = pyro.sample("x", toy.sequence([], max_new_tokens=4))
        ppl_lm.constraint("has_b", ppl_lm.rewards.contains(toy, x, "b"))
        ppl_lm.reward("short", -ppl_lm.rewards.length(toy, x), beta=2.0)
        return x

    post = ppl_lm.infer(model, method="exact")
    print("Toy Markov LM (tokens a, b, c and EOS), condition: contains 'b', reward: -length/2")
    print(f"  exact log Z = {post.log_evidence:.4f} over {post.info.support_size} sequences")
    order = torch.argsort(post.log_weights, descending=True)[:5]
    for i in order.tolist():
        print(f"  p = {post.weights[i].item():.4f}   {post.texts[i]!r}")
    print(f"\nDone in {time.perf_counter() - t0:.1f} s after loading.")


if __name__ == "__main__":
    main()
