"""Never mention violence: a lexicon condition, hard or soft.

π(x | c) ∝ π(x)·1[no word of x is in LEXICON] (``mode="hard"``), or
π(x)·exp(-n(x)/β) with n(x) the number of violent words (``mode="soft"``).

The lexicon is deliberately small and crude (whole words, case-insensitive): it stands for
any "never say X" filter. Easy when the prompt is peaceful (most samples pass), hard when the
prompt invites violence (the default here). The hard condition is prefix-closed once a word
is complete: on a prefix, a match touching the end of the text is ignored ("kill" may grow
into "killjoy"), so a prefix that fails fails for every completion and SMC may prune it.
"""

import re
import sys

import pyro

import ppl_lm
from ppl_lm import rewards

description = "Never mention violence (a ~40-word lexicon): mode='hard' (constraint) or 'soft' (reward -count)."
context = "The two rival knights met on the bridge at dawn, and"
methods = {"smc": {"num_particles": 64}, "importance": {"num_samples": 256}}

LEXICON = (
    "kill", "kills", "killed", "killing", "killer", "murder", "murdered", "murderer",
    "stab", "stabbed", "shoot", "shooting", "shot", "gun", "guns", "knife", "sword",
    "blood", "bloody", "war", "battle", "fight", "fought", "attack", "attacked", "weapon",
    "weapons", "bomb", "violence", "violent", "punch", "die", "died", "dead", "death",
    "wound", "wounded", "torture", "assault", "massacre", "slaughter", "bullet", "rifle",
)

_PATTERN = re.compile(r"\b(?:" + "|".join(map(re.escape, LEXICON)) + r")\b", re.IGNORECASE)


@rewards.text_reward
def violent_words(text: str, complete_only: bool = False) -> float:
    """Number of lexicon words in ``text``; ``complete_only`` skips a match at the very end."""
    return float(sum(1 for m in _PATTERN.finditer(text) if not (complete_only and m.end() == len(text))))


def build(lm, mode: str = "hard", beta: float = 0.5, max_new_tokens: int = 24):
    """The prompted LM conditioned on not mentioning violence.

    Args:
        mode: ``"hard"`` (no violent word at all) or ``"soft"`` (each one costs a factor exp(-1/β)).
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        n = violent_words(lm, x, complete_only=ppl_lm.is_partial())
        if mode == "hard":
            ppl_lm.constraint("no_violence", n == 0, prefix_closed=True)
        else:
            ppl_lm.reward("violence", -n, beta=beta)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
