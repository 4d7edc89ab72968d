"""Training that finds nothing: stop early when no draw satisfies a hard condition, and say why."""

from __future__ import annotations

import numpy as np

__all__ = ["HARD_CONDITION_ADVICE", "NothingAdmissible", "AdmissibleWatch", "no_admissible_message"]


#: What to do when no draw satisfies a hard condition (said by the early stop and after training).
HARD_CONDITION_ADVICE = (
    "the condition may be impossible under this LM and max_new_tokens, or too rare to be found by sampling. "
    "Check the condition (evaluate it on a text that should pass), make it a token mask (ppl_lm.token_constraint) "
    "so that method='smc' proposes only allowed tokens, or turn it into a reward")


class NothingAdmissible(Exception):
    """Training stopped early: no draw has satisfied a hard condition (see AdmissibleWatch)."""


class AdmissibleWatch:
    """The training callback that stops a run whose draws never satisfy a hard condition.

    While no draw satisfies a hard condition, that condition gives the gradient nothing (every
    draw has the same relaxed penalty, or weight zero in the forward objective), so training
    cannot learn it and the final correction would find no admissible draw. After
    ``max(PROBE_STEPS, num_steps // 10)`` such steps the run stops with the advice, instead of
    after all of them.
    """

    PROBE_STEPS = 20

    def __init__(self, num_steps: int, num_particles: int, callback=None):
        self.after = min(num_steps, max(self.PROBE_STEPS, num_steps // 10))
        self.num_particles, self.callback = num_particles, callback
        self.seen: dict[str, bool] = {}
        self.steps = 0

    def __call__(self, step, guide, stats):
        self.steps += 1
        for k, v in stats.items():
            if k.startswith("ok:"):
                self.seen[k[3:]] = self.seen.get(k[3:], False) or bool(v > 0)
        never = [k for k, ok in self.seen.items() if not ok]
        if never and self.steps >= self.after:
            raise NothingAdmissible(
                f"svi: stopped after {self.steps} training step(s) ({self.steps * self.num_particles} draws, from the "
                f"prior onwards): no draw satisfied the hard condition(s) {', '.join(never)}, so training gets no "
                f"signal from them and no guide draw could be weighted: {HARD_CONDITION_ADVICE}. The guide is kept "
                "at err.guide")
        if self.callback is not None:
            self.callback(step, guide, stats)


def no_admissible_message(trace, num_samples) -> str:
    oks = {k[3:]: v for k, v in trace.items() if k.startswith("ok:")}
    seen = {k: float(np.nanmax(v)) if len(v) else 0.0 for k, v in oks.items()}
    never = [k for k, v in seen.items() if not v > 0]
    if never:
        what = (f"no draw of the guide, in training (from the prior onwards) or in the {num_samples} final "
                f"draws, satisfied the hard condition(s) {', '.join(never)}: {HARD_CONDITION_ADVICE}")
    else:
        what = (f"training drew texts satisfying the hard condition(s) (at most "
                f"{', '.join(f'{k}: {v:.0%}' for k, v in seen.items())} of a step's draws), but none of the "
                f"{num_samples} final guide draws did. Use more num_samples, more num_steps, or "
                "objective='forward'")
    return f"svi: {what}. The trained guide is kept at err.guide."
