"""Diagnostics: estimators (each quantity defined once), typed warnings, ArviZ InferenceData."""

from .inference_data import (
    SAMPLE_STAT_KEYS, acceptance, ess, is_mcmc, kish_ess, psis_khat, rhat, sample_text, stat_names, summary,
    to_inference_data, top_samples, weighted_mean, weighted_stats,
)
from .warnings import InferenceWarning

__all__ = [
    "to_inference_data", "is_mcmc", "weighted_mean", "weighted_stats", "psis_khat", "rhat", "acceptance", "ess",
    "summary", "top_samples", "sample_text", "stat_names", "kish_ess", "SAMPLE_STAT_KEYS", "InferenceWarning",
]
