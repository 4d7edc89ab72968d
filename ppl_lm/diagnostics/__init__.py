"""Diagnostics: estimators (each quantity defined once), typed warnings, ArviZ InferenceData.

The names below load on first use (PEP 562): ``ppl_lm.posterior`` needs the estimators, and the
InferenceData module needs ``Posterior``, so importing the package must not import them all.
"""

from __future__ import annotations

import importlib

_FROM = {
    "inference_data": (
        "EXACT_DRAWS", "SAMPLE_STAT_KEYS", "acceptance", "default_num_draws", "effective_draws", "chain_draws",
        "discrete_marginals", "ess", "is_mcmc", "psis_khat", "rhat", "sample_text", "stat_names", "summary",
        "to_inference_data", "top_samples", "weighted_mean", "weighted_stats"),
    "estimators": ("kish_ess", "log_evidence_se", "mcmc_diagnostics", "pareto_khat"),
    "warnings": ("InferenceWarning",),
}
_WHERE = {name: module for module, names in _FROM.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
