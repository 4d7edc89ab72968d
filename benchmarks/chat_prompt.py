"""Empty replies on SmolLM2-Instruct: a plain instruction prompt against the same instruction in
the chat template (``ppl_lm.chat``).

An empty text is a sample whose first token is EOS (SmolLM2's ``<|im_end|>``). For each
instruction, ``--num-samples`` ancestral samples (seeded) from each prompt; the exact
probability of an empty reply, P(EOS first), is printed too (one forward pass).

    python benchmarks/chat_prompt.py --threads 1
"""

from __future__ import annotations

import argparse

import torch

import ppl_lm

INSTRUCTIONS = ("Give a JSON object with a person's name and age.", "Write a short poem about the sea.",
                "Name three fruits.", "Write one short sentence giving a person's name and age.\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = ppl_lm.load_lm(progress=False)
    print(f"| instruction | prompt | empty / {args.num_samples} | P(empty) exact |\n|---|---|---|---|")
    for text in INSTRUCTIONS:
        for kind, prompt in (("plain", text), ("chat", ppl_lm.chat(lm, text))):
            gen = torch.Generator().manual_seed(args.seed)
            tokens, _ = lm.sample(prompt, args.num_samples, args.max_new_tokens, generator=gen)
            empty = int((tokens[:, 0] == lm.eos_id).sum())
            with torch.no_grad():
                p_empty = lm.start(torch.as_tensor(lm.encode(prompt) if isinstance(prompt, str) else prompt), 1
                                   ).logprobs[0, lm.eos_id].exp().item()
            print(f"| {text!r} | {kind} | {empty} ({empty / args.num_samples:.0%}) | {p_empty:.3f} |", flush=True)
            if kind == "chat":
                print(f"|  | chat, first replies | {[lm.decode(t) for t in tokens[:3]]} | |", flush=True)


if __name__ == "__main__":
    main()
