"""A JSON record of a person: the LM answers a chat request with a JSON object.

The context is a user message (``chat = True``): ``ppl-lm run`` puts it in the LM's chat template
(``ppl_lm.chat``), so the reply ends at the end-of-turn token. In code::

    lm = ppl_lm.load_lm().for_chat()
    post = ppl_lm.infer(build(lm), ppl_lm.chat(lm, context), method="smc", num_particles=32)

π(x | c) ∝ π(x | chat prompt)·1[the text of x is a JSON object {"name": <string>, "age":
<integer>} valid under the schema below], as an exact token constraint
(``rewards.json_mask``: llguidance's JSON-schema grammar, fixed layout ``", "`` / ``": "``).
SMC proposes only tokens that keep the text a prefix of a valid object (EOS only once it is
complete, and at the last position only tokens that complete it), with the exact weight
correction, so the posterior is π conditioned on the schema, not a greedy constrained decode.
``mode="soft"``: a reward of 1 for a valid object instead, π(x)·exp(1[valid]/β).
"""

import sys

from ppl_lm import rewards
from ppl_lm.models._masked import masked_model

description = "A JSON object with a string name and an integer age after a chat prompt (JSON-schema token mask)."
context = "Give a JSON object with a person's name and age."
chat = True  # the context is a user message: the CLI applies the LM's chat template
toy_context = "Person: "
methods = {"smc": {"num_particles": 32}, "importance": {"num_samples": 512}}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def build(lm, mode: str = "hard", beta: float = 0.5, max_new_tokens: int = 24):
    """The prompted LM conditioned on answering with a JSON object of :data:`SCHEMA`."""
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    mask = rewards.json_mask(lm, SCHEMA)  # built once: the grammar and the tokenizer's trie
    return masked_model(lm, mask, "json", mode, beta, max_new_tokens)


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
