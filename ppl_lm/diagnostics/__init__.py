"""Diagnostics: estimators (each quantity defined once), typed warnings, ArviZ InferenceData."""

from .inference_data import (
    EXACT_DRAWS, SAMPLE_STAT_KEYS, acceptance, default_num_draws, effective_draws, chain_draws, discrete_marginals, ess, is_mcmc, psis_khat, rhat, sample_text, stat_names, summary,
    to_inference_data, top_samples, weighted_mean, weighted_stats, weights_kish_ess,
)
from .estimators import kish_ess, log_evidence_se, mcmc_diagnostics, pareto_khat
from .warnings import InferenceWarning

__all__ = [
    "to_inference_data", "effective_draws", "default_num_draws", "EXACT_DRAWS", "is_mcmc", "weighted_mean", "weighted_stats", "psis_khat", "rhat", "acceptance", "ess",
    "summary", "discrete_marginals", "top_samples", "sample_text", "stat_names", "weights_kish_ess", "chain_draws", "SAMPLE_STAT_KEYS",
    "InferenceWarning", "kish_ess", "log_evidence_se", "pareto_khat", "mcmc_diagnostics",
]
