"""The SVI training loop, shared by ``method="svi"`` and the data-parallel runner.

One step: the loss (:mod:`~ppl_lm.inference.svi.elbo`) accumulates its surrogate gradient
into the guide's parameters (inside ``poutine.trace(param_only=True)``, as Pyro's ``SVI.step``
collects them), the gradient's global norm is clipped, and Adam takes a step whose size decays
geometrically over the run. A step whose loss or gradient is not finite is skipped (and
counted), so one bad batch never writes NaN into the guide. Every step's draws are kept
(``log q``, ``log π``, the condition factors and the proposal's log-density, a few floats per
draw) so both KL directions can be estimated over training (:func:`kl_trace`) and a resumed
run has the same trace as an uninterrupted one.

Ctrl-C (SIGINT) while checkpointing: the step under way finishes, a checkpoint of it is written,
and :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised; a second Ctrl-C stops at
once, keeping the last checkpoint. Resuming from it gives the uninterrupted run's result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.util import zero_grads
from pyro.optim import Adam
from tqdm.auto import tqdm

from ppl_lm import seeding

from . import checkpoint as _ckpt
from .kl import kl_estimates

__all__ = ["DRAW_FIELDS", "KLTrace", "TrainResult", "TrainingInterrupted", "kl_trace", "train"]

log = logging.getLogger(__name__)

#: The per-draw columns kept for every step (``trace["draws"][step]`` is ``[n, 4]``).
DRAW_FIELDS = ("log_q", "log_prior", "log_likelihood", "log_proposal")


@dataclass(frozen=True)
class KLTrace:
    """Both KL directions after every step, from the draws of the trailing ``window`` steps.

    The estimates pool the window's draws (each draw's weight is unbiased for Z whichever
    step's guide drew it), so they describe the guides of that window, and lag the current
    guide by about half a window. See :func:`~ppl_lm.inference.svi.kl.kl_estimates`.
    """

    step: np.ndarray
    seconds: np.ndarray  # training time after the step
    kl_reverse: np.ndarray  # KL(q‖π′) = log Ẑ − ELBO
    kl_reverse_se: np.ndarray
    kl_forward: np.ndarray  # KL(π′‖q), importance-weighted
    kl_forward_se: np.ndarray
    log_evidence: np.ndarray
    log_evidence_se: np.ndarray
    window: int


@dataclass
class TrainResult:
    """What the loop returns: the guide trained in place, the per-step trace and timings."""

    guide: object
    trace: dict[str, np.ndarray]
    draws: list[torch.Tensor]
    start_step: int
    steps_run: int
    train_time: float
    step_seconds: np.ndarray
    nonfinite_steps: int
    lr: float
    rewards: dict = field(default_factory=dict)  # name -> (min r, max r, β) over the kept draws


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after ``step`` steps, checkpointed at ``checkpoint_path``
    (``None``: no checkpoint was written)."""

    def __init__(self, step: int, checkpoint_path: str | None):
        where = f"; checkpoint of step {step} in {checkpoint_path}" if checkpoint_path else ""
        super().__init__(f"svi training interrupted after step {step}{where}")
        self.step, self.checkpoint_path = step, checkpoint_path


@contextlib.contextmanager
def _deferred_sigint(enabled: bool):
    """While on, the first SIGINT only sets the flag yielded (a list: non-empty once interrupted), so
    the step under way finishes and can be checkpointed whole (never an Adam update half applied);
    a second SIGINT raises ``KeyboardInterrupt`` at once. Off outside the main thread."""
    flag: list[bool] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(True)
        log.warning("svi: interrupted; finishing this step and writing a checkpoint (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _set_lr(optim, lr: float) -> None:
    for opt in optim.optim_objs.values():
        for group in opt.param_groups:
            group["lr"] = lr


def _optim_state(optim, prefix: str) -> dict:
    """Optimiser state keyed by parameter name relative to the guide (stable across processes)."""
    return {k[len(prefix):]: v for k, v in optim.get_state().items() if k.startswith(prefix)}


def release_params(guide) -> None:
    """Take the guide's entries out of Pyro's global param store (the guide keeps its tensors)."""
    store = pyro.get_param_store()
    prefix = guide.name + "$$$"
    for name in [n for n in store.keys() if n.startswith(prefix)]:  # noqa: SIM118 (ParamStoreDict)
        del store[name]


def train(model: Callable, args: tuple, kwargs: dict, guide, loss: Callable[[int], object], *,
          num_steps: int, lr: float, lr_decay: float = 1.0, clip_norm: float | None = 1.0,
          elementwise_clip: float | None = None, contexts: Sequence[tuple] | None = None, checkpoint_path: str | None = None,
          checkpoint_every: int = 50, fingerprint: dict | None = None, write_checkpoints: bool = True,
          progress: bool = True, desc: str = "svi",
          callback: Callable[[int, object, dict], None] | None = None) -> TrainResult:
    """Train ``guide`` in place for ``num_steps`` steps (resuming from a checkpoint of this run).

    Args:
        loss: ``loss(step)`` returns the estimator for that step (an object with
            ``loss_and_grads(model, guide, *args, **kwargs)``, ``last`` (step estimates) and
            ``last_draws`` (``[n, 4]``, :data:`DRAW_FIELDS`)); a schedule switches estimators.
        lr, lr_decay: Adam's step size at step 0 and the factor it has shrunk by at the end
            (geometric in between: ``lr·lr_decay^(step/num_steps)``).
        clip_norm: the gradient's global L2 norm is clipped to this (``None``: no clipping).
        elementwise_clip: clamp each gradient entry to ``[-c, c]`` (Pyro's ``ClippedAdam`` rule;
            measured in ``benchmarks/svi_ablation.py``, off by default).
        contexts: if given, each step trains on one of them, drawn with the seeded generator.
        checkpoint_path, checkpoint_every, fingerprint: resume from / write checkpoints;
            ``write_checkpoints=False`` reads but never writes (the non-zero ranks).
        callback: ``callback(step, guide, stats)`` after each step, off the training clock
            (evaluations); its time is not in ``train_time``.
    """
    prefix = guide.name + "$$$"

    def lr_at(i: int) -> float:
        return lr * lr_decay ** (i / max(num_steps, 1))

    current = [lr]
    optim = Adam(lambda _name: {"lr": current[0]})
    trace: dict[str, list[float]] = {}
    draws: list[torch.Tensor] = []
    betas: dict[str, float] = {}
    step = 0
    if checkpoint_path is not None and fingerprint is not None:
        import os

        if os.path.exists(checkpoint_path):
            state = _ckpt.load(checkpoint_path, fingerprint)
            guide.load_state_dict(state["guide"])
            step = int(state["step"])
            trace = {k: list(v) for k, v in state["trace"].items() if k != "draws"}
            draws = list(state["trace"].get("draws", []))
            # consumed when the per-parameter optimisers are created, at the first step
            optim.set_state({prefix + k: v for k, v in state["optim"].items()})
            log.info("svi: resuming from step %d (%s)", step, checkpoint_path)
    start_step, nonfinite = step, int(sum(trace.get("skipped", [])))
    bar = tqdm(total=num_steps, initial=min(step, num_steps), desc=desc, unit="step", disable=not progress)
    t_train, paused, step_seconds = time.perf_counter(), 0.0, []
    writes = checkpoint_path is not None and write_checkpoints
    saved = step

    def save(at: int) -> float:
        """Checkpoint after step ``at``; returns the seconds it took."""
        t_pause = time.perf_counter()
        _set_lr(optim, lr_at(at))  # the saved state carries the next step's size: exact resume
        _ckpt.save(checkpoint_path, fingerprint, at, guide.state_dict(), _optim_state(optim, prefix),
                   {**trace, "draws": draws})
        return time.perf_counter() - t_pause

    stack = contextlib.ExitStack()
    interrupted = stack.enter_context(_deferred_sigint(writes))
    try:
        while step < num_steps:
            t_step, c_step = time.perf_counter(), time.thread_time()
            ctx = args
            if contexts is not None:
                i = int(torch.randint(len(contexts), (1,), generator=seeding.generator("cpu")))
                ctx = contexts[i]
            est = loss(step)
            with poutine.trace(param_only=True) as pc:
                value = est.loss_and_grads(model, guide, *ctx, **kwargs)
            params = [site["value"].unconstrained() for site in pc.trace.nodes.values()]
            if elementwise_clip is not None:
                for p in params:
                    if p.grad is not None:
                        p.grad.clamp_(-elementwise_clip, elementwise_clip)
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm else math.inf))
            ok = math.isfinite(norm) and not math.isnan(value)
            if ok:
                current[0] = lr_at(step)
                _set_lr(optim, current[0])
                optim(params)
            else:
                nonfinite += 1
            zero_grads(params)
            stats = dict(est.last) if ok else {k: math.nan for k in est.last}
            stats.update(grad_norm=norm, skipped=float(not ok))
            for k, v in stats.items():
                trace.setdefault(k, []).append(v)
            for name, (lo, hi) in (getattr(est, "last_reward_range", None) or {}).items():
                if ok:
                    trace.setdefault(f"reward_min:{name}", []).append(lo)
                    trace.setdefault(f"reward_max:{name}", []).append(hi)
            betas.update(getattr(est, "last_betas", {}) or {})
            draws.append(est.last_draws.detach().float().cpu() if ok else torch.empty(0, len(DRAW_FIELDS)))
            step += 1
            step_seconds.append(time.perf_counter() - t_step)
            trace.setdefault("seconds", []).append(
                (trace["seconds"][-1] if trace.get("seconds") else 0.0) + step_seconds[-1])
            # this thread's CPU time: the cost of training on a shared machine, where wall time
            # also counts other processes
            trace.setdefault("cpu_seconds", []).append(
                (trace["cpu_seconds"][-1] if trace.get("cpu_seconds") else 0.0) + time.thread_time() - c_step)
            stats["seconds"] = trace["seconds"][-1]  # training time so far (checkpoints and callbacks excluded)
            stats["cpu_seconds"] = trace["cpu_seconds"][-1]
            bar.update(1)
            if progress and ok:
                bar.set_postfix(elbo=f"{stats.get('elbo', math.nan):.3f}", kl=f"{stats.get('kl_prior', math.nan):.3f}")
            if writes and (step % checkpoint_every == 0 or step == num_steps):
                paused += save(step)
                saved = step
            if callback is not None:
                t_pause = time.perf_counter()
                callback(step, guide, stats)
                paused += time.perf_counter() - t_pause
            if interrupted:  # Ctrl-C during this step or its callback: the step is done, stop after it
                if saved != step:
                    save(step)
                raise TrainingInterrupted(step, checkpoint_path)
    finally:
        stack.close()
        bar.close()
        release_params(guide)
    train_time = time.perf_counter() - t_train - paused
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in trace.items()}
    ranges = {name: (float(np.min(arrays[f"reward_min:{name}"])), float(np.max(arrays[f"reward_max:{name}"])), beta)
              for name, beta in betas.items() if len(arrays.get(f"reward_min:{name}", ()))}
    return TrainResult(guide, arrays, draws, start_step, step - start_step, train_time, np.asarray(step_seconds),
                       nonfinite, lr, ranges)


def kl_trace(draws: list[torch.Tensor], seconds: np.ndarray | None = None, window: int | None = None) -> KLTrace:
    """Both KLs after every step, each from the draws of the trailing ``window`` steps.

    Default window: a tenth of the run, between 1 and 25 steps. A step whose window holds fewer
    than two draws (all skipped) gets ``nan``.
    """
    n = len(draws)
    if window is None:
        window = max(1, min(25, n // 10))
    keys = ("kl_reverse", "kl_reverse_se", "kl_forward", "kl_forward_se", "log_evidence", "log_evidence_se")
    cols: dict[str, list[float]] = {k: [] for k in keys}
    for end in range(1, n + 1):
        d = torch.cat([x for x in draws[max(0, end - window):end] if x.numel()] or [torch.empty(0, 4)])
        e = kl_estimates(d[:, 0], d[:, 1], d[:, 2], d[:, 3]) if d.shape[0] >= 2 else None
        for k in keys:
            cols[k].append(getattr(e, k) if e is not None else math.nan)
    secs = np.asarray(seconds, dtype=np.float64) if seconds is not None else np.full(n, math.nan)
    return KLTrace(step=np.arange(1, n + 1), seconds=secs, window=window,
                   **{k: np.asarray(v, dtype=np.float64) for k, v in cols.items()})
