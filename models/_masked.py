"""The shape shared by the grammar-mask model scripts (``json_person``, ``regex_sentence``)."""

import pyro

import ppl_lm


def masked_model(lm, mask, name: str, mode: str, beta: float, max_new_tokens: int):
    """``x ~ lm(· | prompt)`` conditioned on ``mask``: exactly (``mode="hard"``, a token constraint)
    or as a reward ``1[text matches] / beta`` (``mode="soft"``)."""
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        if mode == "hard":
            ppl_lm.token_constraint(name, x, mask)
        else:
            ppl_lm.reward(name, mask.check(x).float(), beta=beta)
        return x

    return model
