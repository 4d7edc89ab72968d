"""Diagnostics of a :class:`~ppl_lm.posterior.Posterior`: ArviZ data, summaries, top samples.

Every backend returns the same :class:`Posterior`; this module turns any of them into an
``arviz.InferenceData`` (per-draw scalar summaries, never the token ids) and into the numbers a
report or the CLI shows: log Z with its standard error, ESS, k-hat, R-hat, acceptance and the
weighted means of each reward.

Layout of :func:`to_inference_data`:

* ``posterior``: one variable per per-sample scalar in ``post.stats`` (``log_prior``,
  ``log_likelihood``, ``length``, ``reward:NAME``, ``ok:NAME``...) plus ``log_joint``. MCMC
  posteriors (several chains, or an ``accepted`` statistic) are laid out ``chain × draw`` from
  ``post.chain``; weighted posteriors (importance, SMC, SVI, exact) are one chain whose draws are
  the samples in order, with their weights in ``sample_stats``.
* ``sample_stats``: ``log_weight`` (normalised), ``lp`` (log prior + log likelihood), and for MH
  ``accepted`` and ``move``.
* ``svi_trace`` (SVI only): one variable per per-step array of ``post.info["trace"]``.
* ``attrs``: method, seed, log_evidence, log_evidence_se, ess, khat, wall_time, acceptance...
  (only scalars and strings, so the data set writes to netCDF).

Draw ``d`` of a weighted posterior is ``post.samples[d]``; draw ``(c, d)`` of an MCMC posterior is
the ``d``-th sample of chain ``c`` (``sample_index`` in ``sample_stats`` maps it back).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..posterior import Posterior, ess_of

__all__ = [
    "to_inference_data",
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
    "kish_ess",
    "SAMPLE_STAT_KEYS",
]

log = logging.getLogger(__name__)

#: Per-sample statistics that describe the sampler, not the sample (``sample_stats`` group).
SAMPLE_STAT_KEYS = ("accepted", "move")


def _arviz():
    # ArviZ 0.23 announces its refactor with a FutureWarning on import; it says nothing to users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _check(post: Any) -> Posterior:
    if not isinstance(post, Posterior):
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
    """Per-sample sampler statistics (``accepted``, ``move``): from ``stats`` or ``info["sample_stats"]``."""
    out = {}
    extra = post.info.get("sample_stats")
    if isinstance(extra, dict):
        out.update(extra)
    out.update({k: post.stats[k] for k in SAMPLE_STAT_KEYS if k in post.stats})
    return out


def stat_names(post: Posterior) -> list[str]:
    """The per-sample scalar summaries of ``post`` (its ``stats`` minus sampler statistics)."""
    return [k for k in post.stats if k not in SAMPLE_STAT_KEYS]


def is_mcmc(post: Posterior) -> bool:
    """True for Markov-chain posteriors (laid out chain × draw): MH, or several uniformly weighted chains.

    A weighted posterior whose ``chain`` marks groups (e.g. independent replicates) stays one
    chain of weighted draws.
    """
    if post.method == "mh" or "accepted" in _sampler_stats(post):
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


def _scalar_attrs(info: dict) -> dict[str, Any]:
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

    for k, v in info.items():
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


def to_inference_data(post: Posterior):
    """An ``arviz.InferenceData`` of ``post``'s per-sample scalar summaries (layout: module doc).

    ``arviz.summary``, ``arviz.ess``, ``arviz.rhat`` and ``arviz.plot_trace`` work on it. For a
    weighted posterior ArviZ's means are unweighted; use :func:`weighted_stats` (or resample
    first) for posterior expectations.

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.reward("r", (x == 1).float().sum(-1), beta=1.0)
    >>> idata = ppl_lm.infer(model, method="exact").to_inference_data()
    >>> sorted(idata.posterior.data_vars)
    ['length', 'log_joint', 'log_likelihood', 'log_prior', 'reward:r']
    """
    _check(post)
    az = _arviz()
    index, num_chains, num_draws = _layout(post)

    posterior: dict[str, np.ndarray] = OrderedDict()
    for name in stat_names(post):
        arr = _per_sample(post, name, post.stats[name])
        if arr is not None:
            posterior[name] = arr[index]
    if "log_prior" in posterior and "log_likelihood" in posterior:
        posterior["log_joint"] = posterior["log_prior"] + posterior["log_likelihood"]
    if not posterior:
        # A Posterior built by hand may carry no stats: the length is always known.
        posterior["length"] = _length(post).astype(np.float64)[index]

    log_w = post.log_weights.detach().cpu().double().numpy().reshape(-1)
    sample_stats: dict[str, np.ndarray] = OrderedDict(
        log_weight=log_w[index], sample_index=index.astype(np.int64))
    if "log_joint" in posterior:
        sample_stats["lp"] = posterior["log_joint"]
    for name, value in _sampler_stats(post).items():
        arr = _per_sample(post, name, value)
        if arr is not None:
            arr = arr[index]
            sample_stats[name] = arr.astype(bool) if name == "accepted" else arr.astype(np.int64)

    attrs = _scalar_attrs(post.info)
    attrs.update(method=str(post.method), num_samples=len(post), num_chains=num_chains,
                 num_draws=num_draws, weighted=int(not is_mcmc(post)), ess=float(post.ess))
    attrs.pop("sample_stats", None)
    if post.log_evidence is not None:
        attrs["log_evidence"] = float(post.log_evidence)
    se = post.log_evidence_se()
    if se is not None:
        attrs["log_evidence_se"] = se
    k = psis_khat(post)
    if k is not None:
        attrs["khat"] = k
    acc = acceptance(post)
    if acc is not None:
        attrs["acceptance"] = acc["overall"]
        for mv, rate in acc["moves"].items():
            attrs[f"acceptance_{mv}"] = rate

    with warnings.catch_warnings():
        # `log_likelihood` here is each draw's total log-likelihood (a summary like the others),
        # not the pointwise data ArviZ's LOO/WAIC expect in their own group.
        warnings.filterwarnings("ignore", message="log_likelihood variable found in posterior")
        idata = az.from_dict(posterior=dict(posterior), sample_stats=dict(sample_stats), attrs=attrs)
    for group in ("posterior", "sample_stats"):  # also on the groups, for code that reads only one
        idata[group].attrs.update(attrs)
    if is_mcmc(post) and "ess" not in post.info:
        e = _min_bulk_ess(idata)
        if e is not None:
            idata.attrs["ess"] = e
            for group in ("posterior", "sample_stats"):
                idata[group].attrs["ess"] = e
    trace = post.info.get("trace")
    if isinstance(trace, dict) and trace:
        ds = _trace_dataset(trace)
        if ds is not None:
            ds.attrs.update(attrs)
            idata.add_groups({"svi_trace": ds})
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
    """Pareto k-hat of the importance weights: the backend's ``info["khat"]``, else PSIS's.

    ``None`` for exact and MCMC posteriors (no importance weights to diagnose) and when too few
    samples have positive weight to fit the tail.
    """
    k = post.info.get("khat")
    if k is not None:
        k = float(k.item() if isinstance(k, torch.Tensor) else k)
        return None if math.isnan(k) else k  # ±inf is the backend's verdict: keep it
    if post.method == "exact" or is_mcmc(post):
        return None
    lw = post.log_weights.detach().cpu().double().numpy()
    lw = lw[np.isfinite(lw)]
    if len(lw) < 20 or np.ptp(lw) < 1e-12:
        return None
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = az.psislw(lw.copy())
    k = float(k)
    return k if math.isfinite(k) else None


def rhat(post: Posterior) -> dict[str, float] | None:
    """Rank-normalised split R-hat per summary (``None`` for a single chain or no chains).

    The backend's ``info["rhat"]`` wins when present (a float is reported as ``{"max": r}``).
    """
    r = post.info.get("rhat")
    if r is not None:
        if isinstance(r, dict):
            return {k: float(v) for k, v in r.items()}
        return {"max": float(r.item() if isinstance(r, torch.Tensor) else r)}
    if not is_mcmc(post) or post.num_chains < 2:
        return None
    az = _arviz()
    idata = to_inference_data(post)
    if idata.posterior.sizes.get("draw", 0) < 4:
        return None
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = az.rhat(idata)
    for k in ds.data_vars:
        v = float(ds[k])
        if math.isfinite(v):
            out[k] = v
    return out or None


def acceptance(post: Posterior) -> dict | None:
    """``{"overall": rate, "moves": {move: rate}}`` for MH, else ``None``.

    The overall rate is the backend's ``info["acceptance_overall"]``, else the mean of the
    per-sample ``accepted`` statistic.
    """
    moves = post.info.get("acceptance")
    overall = post.info.get("acceptance_overall")
    accepted = _sampler_stats(post).get("accepted")
    if overall is None and accepted is not None:
        overall = float(torch.as_tensor(accepted).double().mean())
    if isinstance(moves, dict):
        moves = {str(k): float(v) for k, v in moves.items()}
    elif moves is not None:
        overall = float(moves) if overall is None else overall
        moves = {}
    if overall is None and not moves:
        return None
    if overall is None:
        overall = float(np.mean(list(moves.values())))
    return {"overall": float(overall), "moves": moves or {}}


def _min_bulk_ess(idata) -> float | None:
    if idata.posterior.sizes.get("draw", 0) < 4:
        return None
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = az.ess(idata, method="bulk")
    vals = [float(ds[k]) for k in ds.data_vars if math.isfinite(float(ds[k]))]
    return min(vals) if vals else None


def ess(post: Posterior) -> float:
    """The ESS a report shows: the backend's ``info["ess"]``, else its ``info["n_eff"]`` (SMC: the
    genealogy-aware count of independent draws); for MCMC without one, the smallest ArviZ bulk
    ESS over the scalar summaries; else Kish's ESS of the weights."""
    for key in ("ess", "n_eff"):
        if post.info.get(key) is not None:
            return float(post.info[key])
    if is_mcmc(post):
        e = _min_bulk_ess(to_inference_data(post))
        if e is not None:
            return e
    return float(post.ess)


def summary(post: Posterior) -> dict[str, Any]:
    """The numbers of a report table: one flat dict per posterior.

    Keys: method, num_samples, num_chains, log_evidence, log_evidence_se, ess, khat, rhat (the
    largest R-hat, or ``None``), acceptance (overall rate or ``None``), acceptance_moves, means
    (weighted mean of each reward, constraint and the length), wall_time, seed.
    """
    _check(post)
    r = rhat(post)
    acc = acceptance(post)
    means = {}
    for name in stat_names(post):
        if name.startswith(("reward:", "ok:")) or name == "length":
            try:
                means[name] = weighted_mean(post, post.stats[name])
            except ValueError:
                continue
    wall = post.info.get("wall_time")
    return {
        "method": post.method,
        "num_samples": len(post),
        "num_chains": post.num_chains if is_mcmc(post) else 1,
        "log_evidence": None if post.log_evidence is None else float(post.log_evidence),
        "log_evidence_se": post.log_evidence_se(),
        "ess": ess(post),
        "khat": psis_khat(post),
        "rhat": None if not r else max(r.values()),
        "acceptance": None if acc is None else acc["overall"],
        "acceptance_moves": {} if acc is None else acc["moves"],
        "means": means,
        "wall_time": None if wall is None else float(wall),
        "seed": post.info.get("seed"),
    }


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


def top_samples(post: Posterior, k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` distinct samples with the largest total weight.

    Returns dicts with ``text``, ``weight`` (summed over duplicates), ``count``, ``index`` (first
    occurrence) and ``stats`` (that sample's scalar summaries).
    """
    _check(post)
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


def kish_ess(post: Posterior) -> float:
    """Kish's ESS of the weights, whatever the backend reports as ``post.ess``."""
    return ess_of(post.log_weights)
