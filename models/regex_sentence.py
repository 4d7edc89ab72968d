"""A sentence of a fixed shape: "<Name> is <n> years old." as a regular expression.

π(x | c) ∝ π(x | prompt)·1[the text of x fully matches ``[A-Z][a-z]+ is [1-9][0-9]? years
old\\.``] (Python ``re.fullmatch`` semantics), as an exact token constraint
(``rewards.regex_mask``). Every tokenisation of a matching text counts. SMC proposes only
tokens that keep the text a prefix of a match (EOS only after the final "."), with the exact
weight correction; importance sampling and MH check the finished text with the same mask.
``mode="soft"``: a reward of 1 for a match instead, π(x)·exp(1[match]/β). The CLI name is
``regex`` (the module is ``regex_sentence``: a module named ``regex`` would shadow the package).
The context is a user message (``chat = True``): the CLI puts it in the LM's chat template.
"""

import sys

from ppl_lm import rewards
from ppl_lm.models._masked import masked_model

description = 'A sentence "<Name> is <n> years old." (regular expression as an exact token mask).'
context = "Write one short sentence giving a person's name and age."
chat = True  # the context is a user message: the CLI applies the LM's chat template
toy_context = "Write one short sentence giving a person's name and age.\n"
methods = {"smc": {"num_particles": 32}, "importance": {"num_samples": 512}}
PATTERN = r"[A-Z][a-z]+ is [1-9][0-9]? years old\."


def build(lm, pattern: str = PATTERN, mode: str = "hard", beta: float = 0.5, max_new_tokens: int = 16):
    """The prompted LM conditioned on its text fully matching ``pattern``."""
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    mask = rewards.regex_mask(lm, pattern)  # built once: the grammar and the tokenizer's trie
    return masked_model(lm, mask, "regex", mode, beta, max_new_tokens)


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
