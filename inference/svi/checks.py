"""SVI failure detectors: what a failed or doubtful training run says about itself.

Each returns a list of :class:`~ppl_lm.diagnostics.warnings.InferenceWarning` (empty when the
run looks sound). They read the per-step trace and the importance correction, never a
threshold fitted to one run: "beyond its noise" is judged against the trace's own spread.
"""

from __future__ import annotations

import math

import numpy as np

from ppl_lm.diagnostics.warnings import InferenceWarning

__all__ = ["crosscheck", "divergence", "kl_beyond_posterior", "loss_divergence", "nonfinite"]

_LR_FIX = ("lower lr (e.g. by 3x), keep the default clip_norm, or raise num_particles; "
           "post.info.trace shows where it happened")


def _windows(x: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    k = len(x) // w
    blocks = x[len(x) - k * w:].reshape(k, w)
    return blocks.mean(1), blocks.std(1, ddof=1) / math.sqrt(w)


def divergence(elbo: np.ndarray) -> list[InferenceWarning]:
    """Reverse KL: the ELBO's last window lies below its best window by more than 4 standard errors."""
    x = np.asarray(elbo, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 20:
        return []
    w = max(5, len(x) // 10)
    mean, se = _windows(x, w)
    return _fell(mean, se, w, "the ELBO", "fell")


def loss_divergence(loss: np.ndarray, what: str = "the loss") -> list[InferenceWarning]:
    """A minimised loss (DPO's): its last window lies above its best window by more than 4 standard errors."""
    x = np.asarray(loss, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 20:
        return []
    w = max(5, len(x) // 10)
    mean, se = _windows(-x, w)
    return _fell(mean, se, w, what, "rose", sign=-1.0)


def _fell(mean: np.ndarray, se: np.ndarray, w: int, what: str, verb: str, sign: float = 1.0) -> list[InferenceWarning]:
    """``mean`` per window should rise; ``sign`` says how to print it (−1: a loss, printed as itself)."""
    best = int(np.argmax(mean))
    drop = mean[best] - mean[-1]
    noise = math.hypot(se[best], se[-1])
    if best == len(mean) - 1 or not drop > 4 * noise + 1e-9:
        return []
    return [InferenceWarning(
        "svi_divergence",
        f"{what} {verb} from {sign * mean[best]:.3f} (window ending at step {(best + 1) * w}) to {sign * mean[-1]:.3f} in the "
        f"last window, {drop / max(noise, 1e-12):.0f} standard errors below its best: training diverged.",
        _LR_FIX)]


def nonfinite(skipped: int, steps: int) -> list[InferenceWarning]:
    """Steps whose loss or gradient was NaN/inf (skipped, so the guide stayed finite)."""
    if skipped == 0:
        return []
    return [InferenceWarning(
        "svi_nan",
        f"{skipped} of {steps} steps had a NaN or infinite loss or gradient and were skipped.",
        "check the reward and the model for NaN/inf; " + _LR_FIX)]


def kl_beyond_posterior(kl_prior: np.ndarray, reward_range: float | None) -> list[InferenceWarning]:
    """KL(q‖π) beyond what any posterior of a bounded reward can have.

    With rewards in a range of width Δ/β in total (Σ over reward sites of (r_max − r_min)/β),
    KL(π′‖π) ≤ Δ/β and KL(q‖π′) ≥ KL(q‖π) − Δ/β: a guide whose KL(q‖π) exceeds Δ/β by a margin
    is provably that far from the posterior (collapse onto a few texts). ``reward_range`` is
    Δ/β, from the rewards' declared bounds or the range seen in training (a lower bound of the
    true range, so the margin is generous: 1 nat and 4 standard errors).
    """
    x = np.asarray(kl_prior, dtype=np.float64)
    x = x[np.isfinite(x)]
    if reward_range is None or not math.isfinite(reward_range) or len(x) < 5:
        return []
    w = min(len(x), max(5, len(x) // 10))
    last = x[-w:]
    m, se = float(last.mean()), float(last.std(ddof=1) / math.sqrt(w))
    if not m - 4 * se > reward_range + 1.0:
        return []
    return [InferenceWarning(
        "svi_collapse",
        f"KL(q‖π) = {m:.2f} ± {se:.2f} nats over the last {w} steps, more than the {reward_range:.2f} nats that "
        f"any posterior of these rewards can have: the guide is at least {m - reward_range:.1f} nats (KL(q‖π′)) "
        "from the posterior, typically collapsed onto a few texts.",
        _LR_FIX)]


def crosscheck(kl_reverse: float, kl_reverse_se: float, kl_at_prior: float, kl_at_prior_se: float,
               log_z_guide: float, log_z_guide_se: float, log_z_prior: float,
               log_z_prior_se: float) -> list[InferenceWarning]:
    """The trained guide against prior importance sampling (independent draws).

    ``KL(q‖π′) = log Ẑ_prior − ELBO`` should be below ``KL(π‖π′)`` (where training started), and
    the guide's importance estimate of log Z should agree with the prior's: a guide that misses
    posterior mass gives a log Ẑ that is too low, and its weights cannot show it.
    """
    out = []
    if all(map(math.isfinite, (kl_reverse, kl_reverse_se, kl_at_prior, kl_at_prior_se))):
        gap = kl_reverse - kl_at_prior
        if gap > 3 * math.hypot(kl_reverse_se, kl_at_prior_se) + 1e-9:
            out.append(InferenceWarning(
                "svi_worse_than_prior",
                f"after training KL(q‖π′) = {kl_reverse:.3f} ± {kl_reverse_se:.3f} nats, more than at the prior "
                f"({kl_at_prior:.3f} ± {kl_at_prior_se:.3f}): training moved the guide away from the posterior.",
                _LR_FIX))
    if all(map(math.isfinite, (log_z_guide, log_z_guide_se, log_z_prior, log_z_prior_se))):
        gap = log_z_prior - log_z_guide
        if gap > 4 * math.hypot(log_z_guide_se, log_z_prior_se) + 0.05:
            out.append(InferenceWarning(
                "svi_misses_mass",
                f"log Ẑ with the guide as proposal is {log_z_guide:.3f} ± {log_z_guide_se:.3f}, below prior "
                f"importance sampling's {log_z_prior:.3f} ± {log_z_prior_se:.3f}: the guide misses posterior mass, "
                "so its weighted samples are biased.",
                "train with objective='forward' (mass-covering), or use method='smc' / 'importance' with the "
                "prior; " + _LR_FIX))
    return out
