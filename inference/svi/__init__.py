"""Stochastic variational inference: fine-tuning the LM toward a reward is SVI on the model.

The model "prior π, likelihood exp(r/β)" has the posterior π'(x) ∝ π(x)·exp(r(x)/β). A guide q
(the LM with trainable weights, see :mod:`ppl_lm.inference.svi.guides`) is trained with Pyro's ``SVI`` on
the ELBO ``E_q[log π + r/β − log q] = (E_q[r] − β·KL(q‖π))/β``, which is the KL-regularised RL
objective; ``log Z − ELBO = KL(q‖π')``. The estimator is :class:`ppl_lm.inference.svi.elbo.RLOO_ELBO`
(score function, leave-one-out baseline, particles vectorised in one plate).

Hard conditions: while q violates one the reverse KL is infinite, so training uses a relaxed
penalty (each ``-inf`` factor becomes ``-relax_penalty``), and the result is corrected: the
returned :class:`Posterior` holds ``num_samples`` guide draws importance-weighted against the
exact target (``method="importance"`` with the trained guide as proposal), so weights, samples
and ``log_evidence`` are those of the exact conditional whatever the guide's quality.

Checkpoints (``checkpoint_dir``) hold the guide's weights, the optimiser state, the step, the
per-step trace and every random state, written atomically; a run killed at any point and
restarted with the same arguments resumes from the last checkpoint and ends with the same
result as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import random as _pyrandom
import time

import numpy as np
import pyro
import torch
from pyro.infer import SVI
from pyro.optim import ClippedAdam
from tqdm.auto import tqdm

import ppl_lm
from ppl_lm import seeding as _random
from ppl_lm.inference.svi.elbo import RLOO_ELBO
from ppl_lm.inference.svi.guides import GUIDE_KINDS, SequenceGuide, make_guide
from ppl_lm.posterior import Posterior

__all__ = ["run", "DEFAULT_LR", "CHECKPOINT_FILE"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "svi_checkpoint.pt"
#: Adam step sizes that converge at the default particle count: LoRA on a real LM needs small
#: steps; the toy guides (a Markov table, a tiny transformer) take large ones.
DEFAULT_LR = {"lora": 1e-3, "full_markov": 0.1, "full_transformer": 0.01}
_FORMAT = 1


def run(model, *args, seed: int = 0, num_steps: int = 200, num_particles: int = 8, lr: float | None = None,
        guide="full", num_samples: int = 1000, contexts=None, checkpoint_dir: str | None = None,
        checkpoint_every: int = 50, relax_penalty: float | None = 10.0, log_evidence_ref: float | None = None,
        progress: bool = True, lora_r: int = 8, lora_alpha: float = 16, lora_targets=None,
        lr_decay: float = 1.0, clip_norm: float = 10.0) -> Posterior:
    """Train a guide by SVI, then importance-weight its draws against the exact target.

    Args:
        model: a vectorised Pyro model with one ``lm.sequence(...)`` latent site.
        *args: the model's arguments (the context the returned posterior is for).
        seed: same seed, same training and samples (on CPU).
        num_steps: optimisation steps (a resumed run counts the steps already done).
        num_particles: guide draws per step (>= 2), in one vectorised plate.
        lr: Adam step size; default by guide: LoRA 1e-3, full Markov table 0.1, full
            transformer 0.01 (:data:`DEFAULT_LR`).
        guide: ``"full"``, ``"lora"`` or a guide object (a :class:`~ppl_lm.inference.svi.guides.SequenceGuide`,
            e.g. ``post.guide`` of an earlier run, trained further).
        num_samples: guide draws importance-weighted against the exact target at the end.
        contexts: optional list of contexts to train the (amortised) guide on: each step picks
            one with the seeded generator. A context is the tuple of the model's arguments, or
            one argument that is not a tuple.
        checkpoint_dir: folder for the checkpoint; an existing checkpoint of the same run is resumed.
        checkpoint_every: steps between checkpoints (a killed run loses fewer steps than this).
        relax_penalty: training replaces each ``-inf`` condition factor by ``-relax_penalty``
            (nats); ``None`` keeps hard conditions hard (the run fails if the guide violates one).
        log_evidence_ref: a known log Z (exact backend, or a reference importance run): the
            trace then reports ``kl_posterior`` = log Z − ELBO = KL(q‖π'). (While a hard
            condition is relaxed the ELBO is the relaxed target's, and this is
            KL(q‖π'_relaxed) − log(Z_relaxed/Z), slightly less.)
        progress: tqdm progress bar.
        lora_r, lora_alpha, lora_targets: LoRA settings for ``guide="lora"``.
        lr_decay: the step size is multiplied by this over the whole run (geometrically).
        clip_norm: each gradient entry is clipped to ``[-clip_norm, clip_norm]`` (ClippedAdam).

    Returns:
        A :class:`Posterior` of ``num_samples`` importance-weighted guide draws, with
        ``log_evidence`` and ``info["log_evidence_se"]`` from importance sampling, the trained
        guide at ``post.guide``, and ``info["trace"]``: per-step arrays ``elbo``, ``kl_prior``
        (KL(q‖π)), ``reward:NAME`` (E_q[r], raw), ``ok:NAME`` (constraint satisfaction) and,
        given ``log_evidence_ref``, ``kl_posterior``. With one reward site and no constraint,
        ``β·elbo = reward − β·kl_prior``.
    """
    _check_options(num_steps, num_particles, lr, num_samples, checkpoint_every, lr_decay, clip_norm,
                   log_evidence_ref, contexts)
    contexts = None if contexts is None else [c if isinstance(c, tuple) else (c,) for c in contexts]
    t_start = time.perf_counter()
    with _random.seeded(seed):
        g = _build_guide(model, args, guide, lora_r, lora_alpha, lora_targets, seed)
        kind = g.kind
        if lr is None:
            lr = _default_lr(g)
        elbo = RLOO_ELBO(num_particles, relax_penalty=relax_penalty)
        lrd = float(lr_decay) ** (1.0 / max(num_steps, 1))
        optim = ClippedAdam({"lr": lr, "clip_norm": clip_norm, "lrd": lrd})
        svi = SVI(model, g, optim, loss=elbo)
        fingerprint = {"seed": seed, "num_particles": num_particles, "lr": lr, "guide": kind,
                       "relax_penalty": relax_penalty, "lr_decay": lr_decay, "clip_norm": clip_norm,
                       "num_contexts": None if contexts is None else len(contexts),
                       "params": {k: tuple(v.shape) for k, v in _params(g).items()}}
        trace: dict[str, list[float]] = {}
        step = 0
        path = None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_FILE)
        if path is not None and os.path.exists(path):
            step, trace = _load_checkpoint(path, fingerprint, g, optim)
            log.info("svi: resuming from step %d (%s)", step, path)
        start_step = step
        bar = tqdm(total=num_steps, initial=min(step, num_steps), desc="svi", unit="step", disable=not progress)
        t_train = time.perf_counter()
        step_seconds = []
        try:
            while step < num_steps:
                t_step = time.perf_counter()
                ctx = args
                if contexts is not None:
                    i = int(torch.randint(len(contexts), (1,), generator=_random.generator("cpu")))
                    ctx = contexts[i]
                svi.step(*ctx)
                stats = dict(elbo.last)
                for k, v in stats.items():
                    trace.setdefault(k, []).append(v)
                step += 1
                step_seconds.append(time.perf_counter() - t_step)
                bar.update(1)
                if progress:
                    bar.set_postfix(elbo=f"{stats['elbo']:.3f}", kl=f"{stats['kl_prior']:.3f}")
                if path is not None and (step % checkpoint_every == 0 or step == num_steps):
                    _save_checkpoint(path, fingerprint, step, g, optim, trace)
        finally:
            bar.close()
            _release_params(g)
        train_time = time.perf_counter() - t_train
        steps_run = step - start_step

    trace_arrays = {k: np.asarray(v, dtype=np.float64) for k, v in trace.items()}
    if log_evidence_ref is not None and trace:
        trace_arrays["kl_posterior"] = float(log_evidence_ref) - trace_arrays["elbo"]
    info = {
        "trace": trace_arrays,
        "num_steps": num_steps, "num_particles": num_particles, "lr": lr, "guide": kind,
        "relax_penalty": relax_penalty, "start_step": start_step,
        "seconds_per_step": train_time / steps_run if steps_run else float("nan"),
        "step_seconds": np.asarray(step_seconds, dtype=np.float64),  # this session's steps (the first warms up)
        "train_time": train_time,
    }
    if trace:
        info["elbo"] = float(np.mean(trace["elbo"][-max(1, min(20, len(trace["elbo"]))):]))
    log.info("svi: %d steps (from %d), %.3f s/step, final ELBO %s", num_steps, start_step,
             info["seconds_per_step"], info.get("elbo"))

    # A seed distinct from training's, so the correction's draws are independent of the random
    # numbers that shaped the guide.
    post = ppl_lm.infer(model, *args, method="importance", guide=g, num_samples=num_samples,
                        seed=_correction_seed(seed), progress=progress)
    post.method = "svi"
    post.guide = g
    post.info = {**post.info.as_dict(), **info}
    post.seed = seed
    post.wall_time = time.perf_counter() - t_start
    return post


# -- helpers -----------------------------------------------------------------------------------
def _check_options(num_steps, num_particles, lr, num_samples, checkpoint_every, lr_decay, clip_norm,
                   log_evidence_ref, contexts):
    def pos_int(name, v, zero_ok=False):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
            raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")

    pos_int("num_steps", num_steps, zero_ok=True)
    pos_int("num_samples", num_samples)
    pos_int("checkpoint_every", checkpoint_every)
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2:
        raise ValueError(f"num_particles must be an integer >= 2 (the leave-one-out baseline needs two), "
                         f"got {num_particles!r}")
    for name, v in (("lr", lr), ("lr_decay", lr_decay), ("clip_norm", clip_norm)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if log_evidence_ref is not None and not (isinstance(log_evidence_ref, (int, float))
                                             and math.isfinite(log_evidence_ref)):
        raise ValueError(f"log_evidence_ref must be a finite number (a known log Z), got {log_evidence_ref!r}")
    if contexts is not None and (isinstance(contexts, (str, bytes)) or not hasattr(contexts, "__len__")
                                 or len(contexts) == 0):
        raise ValueError("contexts must be a non-empty list of model arguments (one entry per context)")


def _build_guide(model, args, guide, lora_r, lora_alpha, lora_targets, seed):
    if isinstance(guide, str):
        if guide not in GUIDE_KINDS:
            raise ValueError(f"unknown guide {guide!r}; choose one of {', '.join(GUIDE_KINDS)} or pass a guide object")
        return make_guide(model, *args, kind=guide, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets,
                          seed=seed)
    if not callable(guide):
        raise TypeError(f"guide must be 'full', 'lora' or a callable guide, got {type(guide).__name__}")
    if not isinstance(guide, SequenceGuide):
        raise TypeError("a guide object must be a ppl_lm.inference.svi.guides.SequenceGuide (e.g. post.guide of an svi run; "
                        "build one with ppl_lm.inference.svi.guides.make_guide)")
    return guide


def _default_lr(g) -> float:
    from ppl_lm.lm import PositionalMarkovLM

    if g.kind == "lora":
        return DEFAULT_LR["lora"]
    return DEFAULT_LR["full_markov" if isinstance(g.lm, PositionalMarkovLM) else "full_transformer"]


def _params(g) -> dict[str, torch.Tensor]:
    return g.parameters()


def _release_params(g) -> None:
    """Take the guide's entries out of Pyro's global param store (the guide keeps its tensors)."""
    store = pyro.get_param_store()
    prefix = g.name + "$$$"
    for name in [n for n in store.keys() if n.startswith(prefix)]:  # noqa: SIM118 (ParamStoreDict)
        del store[name]


def _correction_seed(seed: int) -> int:
    return (int(seed) * 1_000_003 + 12_345) % (2**62)


def _optim_state(optim, g) -> dict:
    """Optimiser state keyed by parameter name relative to the guide (stable across processes)."""
    prefix = g.name + "$$$"
    return {k[len(prefix):]: v for k, v in optim.get_state().items() if k.startswith(prefix)}


def _numpy_state() -> dict:
    # As tensors and plain numbers, so the checkpoint loads with weights_only=True (no pickle code).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(st: dict) -> None:
    np.random.set_state((st["name"], st["keys"].numpy().astype(np.uint32), st["pos"], st["has_gauss"],
                         st["cached"]))


def _save_checkpoint(path, fingerprint, step, g, optim, trace) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {
        "format": _FORMAT,
        "fingerprint": fingerprint,
        "step": step,
        "guide": g.state_dict(),
        "optim": _optim_state(optim, g),
        "rng": {
            "ppl_lm": {f"{k[0]}:{'' if k[1] is None else k[1]}": v for k, v in _random.state().items()},
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(),
            "python": list(_pyrandom.getstate()),
        },
        "trace": trace,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic: a kill leaves either the old or the new checkpoint
    log.debug("svi: checkpoint at step %d -> %s", step, path)


def _load_checkpoint(path, fingerprint, g, optim):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an svi checkpoint of this version; delete it or use another checkpoint_dir")
    saved = state["fingerprint"]
    if saved != fingerprint:
        diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise ValueError(
            f"{path} holds a checkpoint of a different run (differs in {', '.join(diff)}); restart with the "
            "same arguments to resume, or delete it / choose another checkpoint_dir")
    g.load_state_dict(state["guide"])
    prefix = g.name + "$$$"
    optim.set_state({prefix + k: v for k, v in state["optim"].items()})
    rng = state["rng"]
    states = {}
    for key, st in rng["ppl_lm"].items():
        dev, idx = key.split(":")
        states[(dev, int(idx) if idx else None)] = st
    _random.set_state(states)
    torch.set_rng_state(rng["torch"])
    _set_numpy_state(rng["numpy"])
    _pyrandom.setstate(tuple(rng["python"]))
    return int(state["step"]), {k: list(v) for k, v in state["trace"].items()}
