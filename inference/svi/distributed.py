"""Data-parallel SVI: the particles of each step split over processes (``torch.distributed``).

Each step draws ``num_particles`` guide sequences in ``num_blocks`` equal blocks (by default one
block per process). Block ``b`` of step ``s`` is drawn under its own seed
:func:`block_seed` ``(seed, s, b)``, so the particles of a step are the same whether the blocks
run in K processes or one after another in a single process (``num_blocks=K``, world size 1):
a distributed run and its single-process counterpart give the same ELBO trace and, up to
floating-point summation order, the same gradients and parameters.

Gradient: the estimator of the chosen objective (:mod:`ppl_lm.inference.svi.elbo`: reverse KL
with the RLOO baseline, or forward KL with self-normalised weights). With one context (the
default ``baseline="global"``) its coefficients are computed from all N draws of the step
across processes (one ``all_gather`` of N scalars), which is exactly the single-process
estimator on the pooled draws. With ``contexts`` each block draws its own
context and uses the baseline of its own block (``baseline="local"``). Each process
back-propagates its share of the surrogate and the gradients of the guide's parameters are
summed across processes (one ``all_reduce`` of the flattened gradients per step: what
``DistributedDataParallel`` does, without wrapping a module whose ``forward`` the guide does not
call), so every replica applies the same Adam update and the replicas stay identical.

Training is the one loop of ``method="svi"`` (:func:`ppl_lm.inference.svi.training.train`):
the same defaults (LoRA for a transformer LM, step-size decay, global-norm clipping), seeded
guide construction, and checkpoints (rank 0 writes, every rank resumes).

Launch (``gloo`` on CPU, ``nccl`` on GPU)::

    torchrun --nproc_per_node=4 -m ppl_lm.inference.distributed run sentiment --method svi \\
        --num-steps 200 --num-particles 64 --device cuda --out guide.pt

(the one entry point of :mod:`ppl_lm.inference.distributed`, for importance and SMC too; the old
``-m ppl_lm.inference.svi.distributed MODEL ...`` is forwarded to it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro.infer import ELBO

from ppl_lm import seeding as _random
from ppl_lm.inference.distributed import init, world

from . import checkpoint as _ckpt
from . import training
from .elbo import make_loss, summarise
from .guides import SequenceGuide, model_site

__all__ = ["DistributedLoss", "TrainResult", "block_seed", "init", "main", "train", "world"]

log = logging.getLogger(__name__)

_BASELINES = ("global", "local")


def block_seed(seed: int, step: int, block: int) -> int:
    """The seed of particle block ``block`` at step ``step`` (independent of the world size)."""
    return (int(seed) * 1_000_003 + int(step) * 10_007 + int(block) * 101 + 1) % (2**62)


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistributedLoss(ELBO):
    """An SVI estimator (:func:`~ppl_lm.inference.svi.elbo.make_loss`) with each step's draws in seeded blocks.

    Usable in place of the single-process estimator in the shared training loop (or Pyro's
    ``SVI``); in a process group each process runs its blocks, the per-draw quantities the
    coefficient rule reads are gathered (N scalars), and the gradients are summed across
    processes.

    Args:
        num_particles: draws per step, all processes together.
        seed: base seed of the blocks (see :func:`block_seed`).
        objective, proposal, relax_penalty: as in ``method="svi"``.
        num_blocks: blocks per step (default: the world size); a multiple of the world size
            that divides ``num_particles``.
        baseline: ``"global"`` (the coefficients use all draws of the step; one context) or
            ``"local"`` (the draws of the block; needed when blocks have different
            contexts). Default: global without ``contexts``, local with.
        contexts: optional list of contexts (tuples of model arguments); each block picks one
            with its own seeded generator, and the arguments given to the step are ignored.
    """

    def __init__(self, num_particles: int = 8, seed: int = 0, *, objective: str = "reverse", proposal: str = "guide",
                 num_blocks: int | None = None, baseline: str | None = None, contexts: Sequence[tuple] | None = None,
                 relax_penalty: float | None = None):
        self.base = make_loss(objective, num_particles, proposal=proposal, relax_penalty=relax_penalty)
        super().__init__(num_particles=num_particles, max_plate_nesting=1, vectorize_particles=False)
        rank, size = world()
        num_blocks = size if num_blocks is None else num_blocks
        if not isinstance(num_blocks, int) or num_blocks < 1 or num_blocks % size:
            raise ValueError(f"num_blocks must be a positive multiple of the world size {size}, got {num_blocks!r}")
        if num_particles % num_blocks:
            raise ValueError(f"num_particles={num_particles} must be divisible by the number of blocks "
                             f"{num_blocks} (one block per process by default)")
        if baseline is None:
            baseline = "global" if contexts is None else "local"
        if baseline not in _BASELINES:
            raise ValueError(f"baseline must be one of {_BASELINES}, got {baseline!r}")
        if baseline == "local" and num_particles // num_blocks < 2:
            raise ValueError("baseline='local' needs at least 2 particles per block")
        if contexts is not None:
            if len(contexts) == 0:
                raise ValueError("contexts must be a non-empty list of model arguments")
            contexts = [c if isinstance(c, tuple) else (c,) for c in contexts]
        self.seed, self.num_blocks, self.baseline, self.contexts = int(seed), num_blocks, baseline, contexts
        self.block_size = num_particles // num_blocks
        self.rank, self.world_size = rank, size
        self.step = 0
        self.last: dict[str, float] = {}
        self.last_values: list[dict[str, torch.Tensor]] = []
        self.last_draws = torch.empty(0, 4)
        self.last_betas: dict[str, float] = {}
        self.last_reward_range: dict[str, tuple[float, float]] = {}

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - ELBO's abstract hook
        raise NotImplementedError("the draws are vectorised in blocks; there are no per-particle traces")

    @property
    def blocks(self) -> list[int]:
        """This process's block indices."""
        per = self.num_blocks // self.world_size
        return list(range(self.rank * per, (self.rank + 1) * per))

    def _block_terms(self, model, guide, args, kwargs):
        out = []
        for b in self.blocks:
            with _random.seeded(block_seed(self.seed, self.step, b)):
                ctx = args
                if self.contexts is not None:
                    i = int(torch.randint(len(self.contexts), (1,), generator=_random.generator("cpu")))
                    ctx = self.contexts[i]
                out.append(self.base.terms(model, guide, ctx, kwargs, self.block_size))
        return out

    def _surrogate_and_stats(self, model, guide, args, kwargs):
        terms = self._block_terms(model, guide, args, kwargs)
        self.last_values = [t.values for t in terms]
        a_local = torch.cat([self.base.log_weights(t) for t in terms])
        log_q = torch.cat([t.log_q for t in terms])
        if self.baseline == "global":
            a_all = _all_gather(a_local)
            c_all = self.base.coefficients(a_all.unsqueeze(0))[0]
            per = len(a_local)
            c = c_all[self.rank * per:(self.rank + 1) * per]
        else:
            # each block's own coefficients; the step's surrogate is the mean over blocks
            c = self.base.coefficients(a_local.reshape(len(terms), self.block_size)).reshape(-1) / self.num_blocks
        surrogate = -(c.float() * log_q).sum()
        stats = [summarise(t) for t in terms]
        keys = sorted(stats[0])
        local = torch.tensor([[s[k] for k in keys] for s in stats], dtype=torch.float64).sum(0)
        mean = _all_reduce(local) / self.num_blocks  # blocks have equal sizes
        self.last = dict(zip(keys, mean.tolist()))
        self.last_draws = _all_gather(torch.cat([t.draws() for t in terms]).double()).float()
        self.last_betas = dict(terms[0].betas)
        self.last_reward_range = {k: (min(float(t.rewards[k].min()) for t in terms),
                                      max(float(t.rewards[k].max()) for t in terms)) for k in terms[0].rewards}
        return surrogate

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            self._surrogate_and_stats(model, guide, args, kwargs)
        self.step += 1
        return -self.last["elbo"]

    def differentiable_loss(self, model, guide, *args, **kwargs):
        raise NotImplementedError("use loss_and_grads (the gradients are summed across processes there)")

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        surrogate = self._surrogate_and_stats(model, guide, args, kwargs)
        if surrogate.requires_grad:
            surrogate.backward()
        _all_reduce_grads(_guide_params(guide))
        self.step += 1
        return -self.last["elbo"]


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    if size == 1:
        return x
    dev = _comm_device()
    parts = [torch.empty_like(x, device=dev) for _ in range(size)]
    dist.all_gather(parts, x.to(dev))
    return torch.cat(parts).to(x.device)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return x
    y = x.to(_comm_device())
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def _guide_params(guide) -> list[torch.Tensor]:
    """The trainable parameters, in the same order on every process."""
    if isinstance(guide, SequenceGuide):
        return [p for _, p in sorted(guide.module.named_parameters()) if p.requires_grad]
    store = pyro.get_param_store()
    return [p for _, p in sorted(store.named_parameters()) if p.requires_grad]


def _all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients across processes: one collective over the flattened gradients."""
    if world()[1] == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = _all_reduce(flat)
    offset = 0
    for p in params:
        k = p.grad.numel()
        p.grad.copy_(flat[offset:offset + k].view_as(p.grad))
        offset += k


def _broadcast_params(params: list[torch.Tensor]) -> None:
    """Make every replica start from rank 0's parameters (as DDP does at construction)."""
    if world()[1] == 1 or not params:
        return
    dev = _comm_device()
    with torch.no_grad():
        for p in params:
            buf = p.detach().to(dev).clone()
            dist.broadcast(buf, src=0)
            p.copy_(buf.to(p.device))


@dataclass
class TrainResult:
    """A data-parallel SVI run: the trained guide (identical on every process) and its trace."""

    guide: SequenceGuide
    trace: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


def train(model: Callable, *args, num_steps: int = 200, num_particles: int = 8, guide=None,
          objective: str = "reverse", proposal: str = "guide", lr: float | None = None, seed: int = 0,
          contexts=None, num_blocks: int | None = None, baseline: str | None = None,
          relax_penalty: float | None = 10.0, lr_decay: float = 0.1, clip_norm: float | None = 1.0,
          lora_r: int = 8, lora_alpha: float = 16, lora_targets=None, checkpoint_dir: str | None = None,
          checkpoint_every: int = 50, progress: bool = True, model_kwargs: dict | None = None,
          callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train a guide by data-parallel SVI (call on every process of the group, or in a single one).

    Args:
        model, *args: the vectorised model and its arguments (the training context).
        num_steps: optimisation steps.
        num_particles: draws per step, all processes together.
        guide: ``"lora"``, ``"full"`` or a :class:`~ppl_lm.inference.svi.guides.SequenceGuide`;
            default as in ``method="svi"`` (LoRA for a transformer LM).
        objective, proposal, lr, lr_decay, clip_norm, relax_penalty, lora_r, lora_alpha,
            lora_targets, checkpoint_dir, checkpoint_every, model_kwargs: as in ``method="svi"``
            (``lr`` default: :data:`ppl_lm.inference.svi.DEFAULT_LR`).
        seed: seeds the guide's construction (LoRA initialisation) and the draws: step s, block b
            is drawn under ``block_seed(seed, s, b)``.
        contexts: optional list of contexts (amortised guide): each block draws one.
        num_blocks: draw blocks per step (default: the world size). A single process with
            ``num_blocks=K`` computes what K processes compute.
        baseline: ``"global"`` or ``"local"`` (see :class:`DistributedLoss`).
        progress: tqdm bar on rank 0.
        callback: called on every process as ``callback(step, stats)`` after each step.

    Returns:
        A :class:`TrainResult`; ``trace`` holds per-step ``elbo``, ``kl_prior``, ``reward:NAME``...
        averaged over all draws of the step, and ``grad_norm``.
    """
    from ppl_lm.inference import svi

    kwargs = dict(model_kwargs or {})
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 2:
        raise ValueError(f"num_particles must be an integer >= 2, got {num_particles!r}")
    if guide is not None and not isinstance(guide, (str, SequenceGuide)):
        raise TypeError("guide must be 'lora', 'full' or a ppl_lm.inference.svi.guides.SequenceGuide")
    rank, size = world()
    with _random.seeded(seed):  # guide construction (LoRA init) is seeded alike on every process
        g = svi.build_guide(model, args, kwargs, guide, lora_r, lora_alpha, lora_targets, seed)
    if lr is None:
        lr = svi.default_lr(g)
    params = _guide_params(g)
    _broadcast_params(params)
    loss = DistributedLoss(num_particles, seed, objective=objective, proposal=proposal, num_blocks=num_blocks,
                           baseline=baseline, contexts=contexts, relax_penalty=relax_penalty)
    path = fp = None
    if checkpoint_dir is not None:
        path = os.path.join(checkpoint_dir, _ckpt.CHECKPOINT_FILE)
        _, d = model_site(model, args, kwargs, g.site)
        fp = _ckpt.fingerprint(model, args, kwargs, d.lm, {
            "seed": seed, "objective": objective, "proposal": proposal, "num_particles": num_particles, "lr": lr,
            "guide": g.kind, "relax_penalty": relax_penalty, "lr_decay": lr_decay, "clip_norm": clip_norm,
            "contexts": loss.contexts, "num_blocks": loss.num_blocks, "baseline": loss.baseline,
            "num_steps": num_steps if lr_decay != 1 else None,
            "params": {k: tuple(v.shape) for k, v in g.parameters().items()}})

    def at(step):
        loss.step = step  # the blocks of step s are seeded by s: a resumed run draws what it would have
        return loss

    def on_step(step, _guide, stats):
        if callback is not None:
            callback(step - 1, stats)

    with _random.seeded(seed):
        res = training.train(model, args, kwargs, g, at, num_steps=num_steps, lr=lr,
                             lr_decay=lr_decay, clip_norm=clip_norm, checkpoint_path=path,
                             checkpoint_every=checkpoint_every, fingerprint=fp, write_checkpoints=rank == 0,
                             progress=progress and rank == 0, desc=f"svi x{size}", callback=on_step)
    info = {"world_size": size, "num_blocks": loss.num_blocks, "num_particles": num_particles,
            "baseline": loss.baseline, "objective": objective, "lr": lr, "seconds": res.train_time,
            "start_step": res.start_step, "skipped_steps": res.nonfinite_steps,
            "seconds_per_step": res.train_time / res.steps_run if res.steps_run else float("nan")}
    return TrainResult(g, res.trace, info)


def main(argv=None) -> int:
    """The former command line, forwarded to the one distributed entry point.

    ``python -m ppl_lm.inference.svi.distributed MODEL [options]`` runs
    ``python -m ppl_lm.inference.distributed run MODEL --method svi [options]`` (``--lm tiny-char``
    is ``--lm tiny``).
    """
    import sys

    from ppl_lm.inference import distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["tiny" if a == "tiny-char" else a for a in argv]
    log.warning("this entry point moved: use `torchrun ... -m ppl_lm.inference.distributed run MODEL --method svi "
                "[options]` (same options)")
    return distributed.main(["run", *argv[:1], "--method", "svi", *argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
