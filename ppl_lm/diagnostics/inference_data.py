"""Diagnostics of a :class:`~ppl_lm.posterior.Posterior`: ArviZ data, summaries, top samples.

Every backend returns the same :class:`Posterior`; this module turns any of them into an
``arviz.InferenceData`` (per-draw scalar summaries, never the token ids) and into the numbers a
report or the CLI shows: log Z with its standard error, ESS, k-hat, R-hat, acceptance and the
weighted means of each reward.

Layout of :func:`to_inference_data`:

* ``posterior``: equal-weight draws of every per-sample scalar in ``post.stats`` (``log_prior``,
  ``log_likelihood``, ``length``, ``reward:NAME``, ``ok:NAME``, scalar latents...) plus
  ``log_joint``, so that every ArviZ function gives posterior answers.

  - MCMC posteriors (several uniformly weighted chains, or an ``accepted`` statistic) are laid
    out ``chain × draw`` from ``post.chain``, as drawn.
  - Weighted posteriors (importance, SMC, SVI, exact) are one chain of ``M`` draws made by
    seeded systematic resampling of the weighted draws, shuffled. ``M`` is
    :func:`default_num_draws`: the effective number of draws, rounded (Kish's ESS; SMC's genealogy
    count where smaller), so ArviZ's ESS of them is about what the weights are worth and its
    ``mcse`` does not claim more. An exact posterior's support is resampled to
    :data:`EXACT_DRAWS` draws (its error is the resampling's alone). ``num_draws=`` overrides.
    A draw that fails a hard constraint has weight 0 and is never drawn, so ``log_likelihood``
    stays finite and every ``az.plot_*`` runs; constraints are the ``ok:NAME`` flags.

* ``sample_stats``: ``sample_index`` (which of ``post``'s samples each draw is), ``lp`` (log prior
  + log likelihood); MCMC also ``log_weight`` and MH's ``accepted`` and ``move``.
* ``weighted_posterior`` and ``weighted_sample_stats`` (weighted posteriors only): the weighted
  draws themselves (those with positive weight), with ``log_weight`` (normalised) and
  ``sample_index``. Weighted estimates come from these (:func:`weighted_stats`).
* ``svi_trace`` (SVI only): one variable per per-step array of ``post.info.trace``.
* ``attrs``: method, seed, log_evidence, log_evidence_se, ess, khat, wall_time, acceptance...;
  for weighted posteriors also ``kish_ess``, ``effective_draws``, ``num_weighted_draws``,
  ``num_zero_weight`` and ``resampling_seed`` (only scalars and strings: it writes to netCDF).

Which ESS to believe: for weighted runs ``attrs["effective_draws"]`` (Kish's ESS, or SMC's
genealogy count); ArviZ's ``ess_bulk`` of the resampled draws agrees with it by construction and
says nothing more. For MCMC, ArviZ's ESS of the chains is the one.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..backends import Kind
from ..validation import check_int
from .. import posterior as _posterior
from .. import resampling
from .estimators import MIN_DRAWS_FOR_SE, import_arviz, kish_ess, mcmc_diagnostics, pareto_khat

if TYPE_CHECKING:
    from ..posterior import Posterior

__all__ = [
    "to_inference_data",
    "effective_draws",
    "default_num_draws",
    "EXACT_DRAWS",
    "is_mcmc",
    "weighted_mean",
    "weighted_stats",
    "psis_khat",
    "rhat",
    "acceptance",
    "ess",
    "summary",
    "top_samples",
    "sample_text",
    "stat_names",
    "chain_draws",
    "SAMPLE_STAT_KEYS",
]

log = logging.getLogger(__name__)

#: Equal-weight draws that an exact posterior's support is resampled to in ``posterior``: the
#: resampling's own Monte Carlo error (at most sd/sqrt(4000) on a mean) is what ArviZ then reports.
EXACT_DRAWS = 4000

#: Per-sample statistics that describe the sampler, not the sample (``sample_stats`` group).
SAMPLE_STAT_KEYS = ("accepted", "move")


def _check(post: Any) -> Posterior:
    if not isinstance(post, _posterior.Posterior):
        raise TypeError(f"expected a ppl_lm.Posterior, got {type(post).__name__}")
    if len(post) == 0:
        raise ValueError("this Posterior has no samples")
    return post


def _per_sample(post: Posterior, name: str, value: Any) -> np.ndarray | None:
    """``value`` as a float64 array ``[N]``, or ``None`` (with a log line) if it is not per-sample."""
    arr = value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if arr.ndim != 1 or arr.shape[0] != len(post):
        if arr.size == len(post):
            arr = arr.reshape(-1)
        else:
            log.debug("stat %r has shape %s, not [%d]; left out of the InferenceData", name, arr.shape, len(post))
            return None
    return arr.astype(np.float64)


def _sampler_stats(post: Posterior) -> dict[str, Any]:
    """Per-sample sampler statistics (``accepted``, ``move``) in ``post.stats``."""
    return {k: post.stats[k] for k in SAMPLE_STAT_KEYS if k in post.stats}


def stat_names(post: Posterior) -> list[str]:
    """The per-sample scalar summaries of ``post`` (its ``stats`` minus sampler statistics)."""
    return [k for k in post.stats if k not in SAMPLE_STAT_KEYS]


def is_mcmc(post: Posterior) -> bool:
    """True for Markov-chain posteriors (laid out chain × draw): MH, or several uniformly weighted chains.

    A weighted posterior whose ``chain`` marks groups (e.g. independent replicates) stays one
    chain of weighted draws.
    """
    if post.is_mcmc or "accepted" in _sampler_stats(post):
        return True
    if post.num_chains > 1:
        lw = post.log_weights.detach().double()
        return bool(torch.isfinite(lw).all() and (lw - lw[0]).abs().max() < 1e-6)
    return False


def _layout(post: Posterior) -> tuple[np.ndarray, int, int]:
    """Indices into the samples, shaped ``[chains, draws]``."""
    n = len(post)
    if not is_mcmc(post):
        return np.arange(n).reshape(1, n), 1, n
    chain = post.chain.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if chain.shape[0] != n:
        raise ValueError(f"post.chain has {chain.shape[0]} entries for {n} samples")
    ids = sorted(set(chain.tolist()))
    rows = [np.flatnonzero(chain == c) for c in ids]  # keeps each chain's order
    draws = min(len(r) for r in rows)
    if any(len(r) != draws for r in rows):
        log.warning("chains have unequal lengths %s; each is cut to %d draws for ArviZ",
                    [len(r) for r in rows], draws)
    return np.stack([r[:draws] for r in rows]), len(ids), draws


def _scalar_attrs(info: Any) -> dict[str, Any]:
    """Run-level facts as netCDF-friendly attrs (numbers and strings; dicts flattened one level)."""
    out: dict[str, Any] = {}

    def put(key: str, v: Any):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bool):
            out[key] = int(v)
        elif isinstance(v, (int, float, str)):
            out[key] = v

    items = info.as_dict().items() if isinstance(info, _posterior.Info) else dict(info).items()
    for k, v in items:
        if k == "trace":
            continue
        if isinstance(v, dict):
            for k2, v2 in v.items():
                put(f"{k}_{k2}", v2)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            out[k] = ", ".join(v)
        else:
            put(k, v)
    return out


def _trace_dataset(trace: dict):
    import xarray as xr

    arrays = {}
    for k, v in trace.items():
        a = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
        arrays[k] = a.reshape(-1) if a.ndim == 0 else a
    if not arrays:
        return None
    steps = max(a.shape[0] for a in arrays.values())
    data = {}
    for k, a in arrays.items():
        dims = ["step" if a.shape[0] == steps else f"{k}_step"] + [f"{k}_dim_{i}" for i in range(1, a.ndim)]
        data[k] = (dims, a)
    return xr.Dataset(data, coords={"step": np.arange(steps)})


def effective_draws(post: Posterior) -> float:
    """How many independent posterior draws ``post``'s draws are worth, the count every
    "too few" check and the ``posterior`` group's size rest on.

    MCMC: ``post.ess`` (ArviZ's smallest bulk ESS, at most the number of draws). Weighted draws:
    Kish's ESS, or SMC's genealogy count (``info.n_eff_genealogy``) where it is smaller (Kish's
    overstates what resampled particles hold). An enumeration (``info.support_size``): ``inf``.
    """
    if is_mcmc(post):
        return float(post.ess)
    if post.kind is Kind.EXACT:
        return math.inf
    n = kish_ess(post.log_weights)
    lineage = getattr(post.info, "n_eff_genealogy", None)
    if lineage is not None and math.isfinite(float(lineage)):
        n = min(n, float(lineage))
    return n


def default_num_draws(post: Posterior) -> int:
    """The number of equal-weight draws :func:`to_inference_data` puts in ``posterior`` for a
    weighted ``post``: :data:`EXACT_DRAWS` for an enumeration, else :func:`effective_draws`
    rounded (at least 1), so that ArviZ's ESS of them is about what the weighted draws are worth."""
    n_eff = effective_draws(post)
    if math.isinf(n_eff):
        return EXACT_DRAWS
    return max(1, min(len(post), int(round(n_eff))))


def _scalars(post: Posterior) -> dict[str, np.ndarray]:
    """Every per-sample scalar summary ``[N]`` (``log_joint`` added; the length when there are none)."""
    out: dict[str, np.ndarray] = OrderedDict()
    for name in stat_names(post):
        arr = _per_sample(post, name, post.stats[name])
        if arr is not None:
            out[name] = arr
    if "log_prior" in out and "log_likelihood" in out:
        out["log_joint"] = out["log_prior"] + out["log_likelihood"]
    if not out and post.samples is not None:
        # A Posterior built by hand may carry no stats: the length is always known.
        out["length"] = _length(post).astype(np.float64)
    return out


def _attrs(post: Posterior, num_chains: int, num_draws: int) -> dict[str, Any]:
    attrs = _scalar_attrs(post.info)
    attrs.update(method=str(post.method), num_samples=len(post), num_chains=num_chains,
                 num_draws=num_draws, weighted=int(not is_mcmc(post)), ess=float(post.ess))
    for key in ("seed", "wall_time", "log_evidence", "log_evidence_se", "rhat"):
        if getattr(post, key) is not None:
            attrs[key] = getattr(post, key)
    if post.warnings:
        attrs["warnings"] = "; ".join(w.code for w in post.warnings)
    k = psis_khat(post)
    if k is not None:
        attrs["khat"] = k
    acc = acceptance(post)
    if acc is not None:
        attrs["acceptance"] = acc["overall"]
        for mv, rate in acc["moves"].items():
            attrs[f"acceptance_{mv}"] = rate
    return attrs


def _resampled(post: Posterior, num_draws: int | None, seed: int | None) -> tuple[np.ndarray, int]:
    """Indices ``[M]`` of ``M`` equal-weight draws (systematic resampling, shuffled), and the seed used."""
    if num_draws is None:
        num_draws = default_num_draws(post)
    check_int("num_draws", num_draws)
    seed = int(post.seed or 0) if seed is None else int(seed)
    g = torch.Generator().manual_seed(seed)
    idx = resampling.resample(torch.softmax(post.log_weights.double(), 0), int(num_draws), "systematic", g)
    # Systematic resampling returns copies side by side; shuffled, they are exchangeable draws and
    # ArviZ's autocorrelation-based ESS reads them as such.
    return idx[torch.randperm(len(idx), generator=g)].numpy(), seed


def _dataset(arrays: dict[str, np.ndarray], attrs: dict):
    import xarray as xr

    ds = xr.Dataset({k: (("chain", "draw"), v) for k, v in arrays.items()},
                    coords={"chain": [0], "draw": np.arange(next(iter(arrays.values())).shape[1])})
    ds.attrs.update(attrs)
    return ds


def to_inference_data(post: Posterior, *, num_draws: int | None = None, seed: int | None = None):
    """An ``arviz.InferenceData`` of ``post``'s per-sample scalar summaries (layout: module doc).

    ``posterior`` always holds equal-weight draws, so ``arviz.summary``, ``arviz.ess`` and every
    ``arviz.plot_*`` give posterior answers. For a weighted posterior (importance, SMC, SVI, exact)
    they are a seeded systematic resampling of the weighted draws, which stay in
    ``weighted_posterior`` with their log-weights in ``weighted_sample_stats``.

    Args:
        num_draws: equal-weight draws to resample (weighted posteriors only); default
            :func:`default_num_draws`: about the effective number of draws (Kish's ESS), so that
            ArviZ's ESS and Monte Carlo errors do not claim more than the weights hold.
        seed: of the resampling (default: the run's seed, else 0).

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.reward("r", (x == 1).float().sum(-1), beta=1.0)
    >>> idata = ppl_lm.infer(model, method="exact").to_inference_data()
    >>> sorted(idata.posterior.data_vars)
    ['length', 'log_joint', 'log_likelihood', 'log_prior', 'reward:r']
    >>> idata.posterior.sizes["draw"], idata.weighted_posterior.sizes["draw"]
    (4000, 7)
    """
    _check(post)
    az = import_arviz()
    scalars = _scalars(post)
    if not scalars:
        raise ValueError("this Posterior has no per-sample summaries (post.stats) and no samples: nothing to put "
                         "in an InferenceData")
    log_w = post.log_weights.detach().cpu().double().numpy().reshape(-1)
    extra = {}
    if is_mcmc(post):
        index, num_chains, n_draws = _layout(post)
        attrs = _attrs(post, num_chains, n_draws)
        sample_stats: dict[str, np.ndarray] = OrderedDict(log_weight=log_w[index], sample_index=index.astype(np.int64))
    else:
        idx, seed = _resampled(post, num_draws, seed)
        index = idx.reshape(1, -1)
        attrs = _attrs(post, 1, len(idx))
        keep = np.flatnonzero(np.isfinite(log_w))  # a zero weight adds nothing to any estimate
        attrs.update(kish_ess=kish_ess(post.log_weights), effective_draws=float(effective_draws(post)),
                     posterior_draws="systematic resampling of the weighted draws (equal weights)",
                     resampling_seed=seed, num_weighted_draws=len(keep), num_zero_weight=len(log_w) - len(keep))
        sample_stats = OrderedDict(sample_index=index.astype(np.int64))
        weighted = {k: v[keep][None] for k, v in scalars.items()}
        extra = {"weighted_posterior": _dataset(weighted, attrs),
                 "weighted_sample_stats": _dataset({"log_weight": log_w[keep][None],
                                                    "sample_index": keep[None].astype(np.int64)}, attrs)}
    posterior = OrderedDict((k, v[index]) for k, v in scalars.items())
    if "log_joint" in posterior:
        sample_stats["lp"] = posterior["log_joint"]
    for name, value in _sampler_stats(post).items():
        arr = _per_sample(post, name, value)
        if arr is not None:
            arr = arr[index]
            sample_stats[name] = arr.astype(bool) if name == "accepted" else arr.astype(np.int64)

    with warnings.catch_warnings():
        # `log_likelihood` here is each draw's total log-likelihood (a summary like the others),
        # not the pointwise data ArviZ's LOO/WAIC expect in their own group.
        warnings.filterwarnings("ignore", message="log_likelihood variable found in posterior")
        idata = az.from_dict(posterior=dict(posterior), sample_stats=dict(sample_stats), attrs=attrs)
    for group in ("posterior", "sample_stats"):  # also on the groups, for code that reads only one
        idata[group].attrs.update(attrs)
    trace = getattr(post.info, "trace", None)
    if isinstance(trace, dict) and trace:
        ds = _trace_dataset(trace)
        if ds is not None:
            ds.attrs.update(attrs)
            extra["svi_trace"] = ds
    if extra:
        with warnings.catch_warnings():  # groups outside ArviZ's schema, on purpose
            warnings.filterwarnings("ignore", message=".*not defined in the InferenceData scheme")
            idata.add_groups(extra)
    return idata


def _length(post: Posterior) -> np.ndarray:
    if "length" in post.stats:
        return post.stats["length"].detach().cpu().double().numpy()
    from ..tokens import lengths

    eos = getattr(post.lm, "eos_id", None)
    if eos is None:
        return np.full(len(post), post.samples.shape[-1], dtype=np.float64)
    return lengths(post.samples, eos).double().numpy()


# -- weighted estimates -----------------------------------------------------------------------

def weighted_mean(post: Posterior, values: Any) -> float:
    """Σ w_i v_i over samples with positive weight (so a zero-weight ``-inf`` is no NaN)."""
    return weighted_stats(post, values)["mean"]


def weighted_stats(post: Posterior, values: Any) -> dict[str, float]:
    """Weighted mean and standard deviation of a per-sample quantity (or ``stats`` name)."""
    if isinstance(values, str):
        values = post.stats[values]
    v = _per_sample(post, "values", values)
    if v is None:
        raise ValueError(f"expected one value per sample ({len(post)}), got shape {np.shape(values)}")
    w = post.weights.detach().cpu().numpy()
    keep = w > 0
    w, v = w[keep], v[keep]
    mean = float(np.sum(w * v) / np.sum(w))
    var = float(np.sum(w * (v - mean) ** 2) / np.sum(w)) if math.isfinite(mean) else float("nan")
    return {"mean": mean, "sd": math.sqrt(max(var, 0.0)) if math.isfinite(var) else float("nan")}


def psis_khat(post: Posterior) -> float | None:
    """Pareto k-hat of the importance weights: ``post.khat``, else :func:`pareto_khat` of the weights.

    ``None`` for exact and MCMC posteriors (no importance weights to diagnose) and where the tail
    fit is undefined (too few samples).
    """
    if post.khat is not None:
        return post.khat
    if post.kind is Kind.EXACT or is_mcmc(post):  # an enumeration's weights are exact
        return None
    k = pareto_khat(post.log_weights)
    return None if math.isnan(k) else k


def chain_draws(post: Posterior) -> dict[str, np.ndarray]:
    """Each scalar summary laid out ``[chains, draws]`` (one chain for weighted posteriors)."""
    index, _, _ = _layout(post)
    out = {}
    for name in stat_names(post):
        arr = _per_sample(post, name, post.stats[name])
        if arr is not None:
            out[name] = arr[index]
    return out


def rhat(post: Posterior) -> dict[str, float] | None:
    """Rank-normalised split R-hat per scalar summary (``None`` for a single chain or no chains)."""
    by_stat = getattr(post.info, "rhat_by_stat", None)
    if by_stat:
        return dict(by_stat)
    if not is_mcmc(post) or post.num_chains < 2:
        return None
    r, _ = mcmc_diagnostics(chain_draws(post))
    return r or None


def acceptance(post: Posterior) -> dict | None:
    """``{"overall": rate, "moves": {move: rate}}`` for MH, else ``None``."""
    moves = getattr(post.info, "acceptance", None)
    overall = getattr(post.info, "acceptance_overall", None)
    accepted = _sampler_stats(post).get("accepted")
    if overall is None and accepted is not None:
        overall = float(torch.as_tensor(accepted).double().mean())
    if overall is None and not moves:
        return None
    moves = {str(k): float(v) for k, v in (moves or {}).items()}
    if overall is None:
        overall = float(np.mean(list(moves.values())))
    if not math.isfinite(float(overall)):  # no edit was proposed (every text observed): no rate to show
        return None
    return {"overall": float(overall), "moves": moves}


def ess(post: Posterior) -> float:
    """The one ESS: ``post.ess`` (ArviZ bulk ESS for MCMC, Kish's for weighted samples)."""
    return float(post.ess)


def summary(post: Posterior) -> dict[str, Any]:
    """The numbers of a report table: one flat dict per posterior.

    Keys: method, num_samples, num_chains, log_evidence, log_evidence_se (``None`` with
    ``log_evidence_se_reason`` when it is no error bar), log_evidence_bounds ((lower, upper)
    once :func:`ppl_lm.log_evidence_bounds` has bounded log Z from exact draws, else ``None``),
    ess (with ``ess_note`` when capped), effective_draws (:func:`effective_draws`), n_eff_genealogy (SMC's genealogy-based count of
    independent draws, else ``None``), khat (``None`` with ``khat_reason`` when undefined), rhat
    (the largest R-hat, or ``None``), acceptance (overall rate or ``None``), acceptance_moves,
    means (weighted mean of each reward, constraint and the length), marginals
    (:func:`discrete_marginals`), wall_time, seed, warnings, verdict (one line:
    :func:`~ppl_lm.diagnostics.warnings.verdict`).
    """
    from .warnings import verdict

    _check(post)
    r = rhat(post)
    acc = acceptance(post)
    se, se_reason = post.log_evidence_se, log_evidence_se_reason(post)
    k = psis_khat(post)
    k_reason = khat_reason(post, k)
    means = {}
    for name in stat_names(post):
        if name.startswith(("reward:", "ok:")) or name == "length":
            try:
                means[name] = weighted_mean(post, post.stats[name])
            except ValueError:
                continue
    return {
        "method": post.method,
        "num_samples": len(post),
        "num_chains": post.num_chains if is_mcmc(post) else 1,
        "log_evidence": None if post.log_evidence is None else float(post.log_evidence),
        "log_evidence_se": None if se_reason else se,
        "log_evidence_se_reason": se_reason,
        "log_evidence_bounds": None if post.evidence_bounds is None else tuple(post.evidence_bounds),
        "ess": ess(post),
        "ess_note": ess_note(post),
        "effective_draws": effective_draws(post),
        "n_eff_genealogy": getattr(post.info, "n_eff_genealogy", None),
        "khat": None if k_reason else k,
        "khat_reason": k_reason,
        "rhat": post.rhat if post.rhat is not None else (None if not r else max(r.values())),
        "acceptance": None if acc is None else acc["overall"],
        "acceptance_moves": {} if acc is None else acc["moves"],
        "means": means,
        "marginals": discrete_marginals(post),
        "wall_time": post.wall_time,
        "seed": post.seed,
        "warnings": list(post.warnings),
        "verdict": verdict(post),
    }


def log_evidence_se_reason(post: Posterior) -> str | None:
    """Why ``post.log_evidence_se`` is no error bar (``None`` when it is one): fewer than
    :data:`MIN_DRAWS_FOR_SE` ancestors behind SMC's one genealogy (with a single ancestor the
    Lee-Whiteley estimate is 1.0 whatever the truth), or fewer effective weighted draws (one draw
    carrying every weight gives the delta method's se 1.0, too)."""
    if post.log_evidence_se is None or post.kind is Kind.EXACT:
        return None
    eves, reps = getattr(post.info, "num_eves", None), getattr(post.info, "num_replicates", None) or 1
    if eves is not None and reps < 2:
        if int(eves) < MIN_DRAWS_FOR_SE:
            return f"path degeneracy: {int(eves)} ancestor{'s' if int(eves) != 1 else ''}, fewer than {MIN_DRAWS_FOR_SE}"
        return None
    if not is_mcmc(post) and eves is None:
        n = kish_ess(post.log_weights)
        if n < MIN_DRAWS_FOR_SE:
            return f"{n:.1f} effective draws, fewer than {MIN_DRAWS_FOR_SE}"
    return None


def khat_reason(post: Posterior, khat: float | None) -> str | None:
    """Why a weighted posterior has no k-hat to show (``None`` where it has one, or needs none)."""
    if is_mcmc(post) or post.kind is Kind.EXACT:
        return None
    if khat is not None and khat == -math.inf:
        return "the largest weights are tied: no tail to fit"
    if khat is None:
        return "too few weights for a tail fit"
    return None


def ess_note(post: Posterior) -> str | None:
    """Why the ESS shown is not ArviZ's own number (``None`` when it is): MCMC's ESS is capped at the draws."""
    if post.bulk_ess is not None and post.bulk_ess > len(post):
        return (f"capped at the {len(post)} draws: ArviZ's bulk ESS is {post.bulk_ess:.0f} "
                "(anti-correlated draws), which no estimate here can use")
    return None


# -- samples ----------------------------------------------------------------------------------

def sample_text(post: Posterior, row) -> str:
    """The decoded text of one sample (token ids when the Posterior has no LM)."""
    ids = row.tolist() if isinstance(row, torch.Tensor) else list(row)
    if post.lm is not None:
        try:
            return post.lm.decode(ids)
        except Exception as err:  # a toy LM without a vocabulary
            log.debug("decode failed (%s); showing token ids", err)
    eos = getattr(post.lm, "eos_id", None)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return " ".join(map(str, ids))


def discrete_marginals(post: Posterior, max_values: int = 50) -> dict[str, dict]:
    """``post.marginal(name)`` of every scalar latent with integer values (at most ``max_values``
    distinct ones): ``{name: {value: (probability, standard error)}}``, in program order."""
    out = {}
    for name, v in post.values.items():
        if name == post.site or v.dim() > 2 or (v.dim() == 2 and v.shape[1] != 1) or len(v) != len(post):
            continue
        v = v.reshape(-1)
        if v.dtype.is_floating_point and not bool((v == v.round()).all()):
            continue
        if len(torch.unique(v)) <= max_values:
            out[name] = post.marginal(name)
    return out


def top_samples(post: Posterior, k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` distinct samples with the largest total weight (none when every sequence site is
    observed: ``post.samples`` is ``None``).

    Returns dicts with ``text``, ``weight`` (summed over duplicates), ``count``, ``index`` (first
    occurrence) and ``stats`` (that sample's scalar summaries).
    """
    _check(post)
    if post.samples is None:
        return []
    w = post.weights.detach().cpu().numpy()
    groups: dict[tuple, list] = {}
    for i, row in enumerate(post.samples.tolist()):
        g = groups.setdefault(tuple(row), [0.0, 0, i])
        g[0] += float(w[i])
        g[1] += 1
    best = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[1][2]))[: max(k, 0)]
    out = []
    for row, (weight, count, i) in best:
        stats = {}
        for name in stat_names(post):
            v = post.stats[name]
            if isinstance(v, torch.Tensor) and v.dim() == 1 and len(v) == len(post):
                stats[name] = float(v[i])
        out.append({"text": sample_text(post, row), "weight": weight, "count": count,
                    "index": i, "stats": stats})
    return out
