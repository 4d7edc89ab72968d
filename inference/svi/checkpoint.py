"""SVI checkpoints: the guide, the optimiser, the step, the trace and every random state.

A checkpoint is written atomically (a kill leaves the old or the new file, never a torn one)
and loads with ``weights_only=True``. It carries a fingerprint of the run: the model (its
qualified name and a hash of its source and of the simple values it closes over, e.g. β), its
arguments (the context) and keyword arguments, the LM (class, vocabulary, a hash of its
weights) and the training options. Resuming with any of these changed is an error naming what
differs, never a silent resume of another run.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import random as _pyrandom

import numpy as np
import torch

from ppl_lm import seeding

__all__ = ["CHECKPOINT_FILE", "CheckpointMismatch", "fingerprint", "load", "save"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "svi_checkpoint.pt"
_FORMAT = 2
_SIMPLE = (bool, int, float, str, bytes, type(None))


class CheckpointMismatch(ValueError):
    """A checkpoint exists in ``checkpoint_dir`` but belongs to a different run."""


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() if not isinstance(p, bytes) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _plain(value, depth: int = 0):
    """A repr-stable rendering of simple values (contexts, kwargs, closure cells)."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), _digest(value.detach().cpu().contiguous().numpy().tobytes()))
    if isinstance(value, (list, tuple)) and depth < 3:
        return tuple(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 3:
        return tuple(sorted((str(k), _plain(v, depth + 1)) for k, v in value.items()))
    return type(value).__qualname__


def model_fingerprint(model) -> str:
    """The model's name, source and the simple values it closes over (a rebuilt β differs)."""
    fn = getattr(model, "__wrapped__", model)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        src = code.co_code if code is not None else name
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cells.append(_plain(cell.cell_contents))
        except ValueError:  # an empty cell
            cells.append(None)
    defaults = _plain(getattr(fn, "__defaults__", None))
    return f"{name}@{_digest(src, cells, defaults)}"


def lm_fingerprint(lm) -> str:
    """The LM's class, vocabulary and a hash of a strided sample of its weights."""
    if lm is None:  # a model with no LM site the checkpoint could be tied to
        return _digest("no LM")
    parts = [type(lm).__qualname__, getattr(lm, "vocab_size", None), getattr(lm, "eos_id", None)]
    if getattr(lm, "stop_ids", ()):  # lm.for_chat(): another law over the same weights
        parts.append(("stop_ids", tuple(lm.stop_ids)))
    net = getattr(lm, "model", None)
    tensors = []
    if isinstance(net, torch.nn.Module):
        parts.append(getattr(getattr(net, "config", None), "_name_or_path", None))
        tensors = [p for _, p in sorted(net.state_dict().items()) if ".lora_" not in _]
    else:
        tensors = [v for k, v in sorted(vars(lm).items()) if isinstance(v, torch.Tensor)]
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        parts.append((tuple(t.shape), _digest(flat[::step].float().cpu().numpy().tobytes())))
    return _digest(*parts)


def fingerprint(model, args: tuple, kwargs: dict, lm, options: dict) -> dict:
    """What a checkpoint must match to be resumed."""
    # The dtype on its own line: a checkpoint of a bfloat16 run trained another model than float32's.
    dtype = getattr(lm, "dtype", None)
    return {"model": model_fingerprint(model), "args": _digest(_plain(args)),
            "model_kwargs": _digest(_plain(kwargs)), "lm": lm_fingerprint(lm),
            "lm_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            **{k: _plain(v) for k, v in options.items()}}


def _numpy_state() -> dict:
    # As tensors and plain numbers, so the checkpoint loads with weights_only=True (no pickle code).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(st: dict) -> None:
    np.random.set_state((st["name"], st["keys"].numpy().astype(np.uint32), st["pos"], st["has_gauss"],
                         st["cached"]))


def save(path: str, fp: dict, step: int, guide_state: dict, optim_state: dict, trace: dict) -> None:
    """Write the checkpoint atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {
        "format": _FORMAT, "fingerprint": fp, "step": step, "guide": guide_state, "optim": optim_state,
        "rng": {
            "ppl_lm": {f"{k[0]}:{'' if k[1] is None else k[1]}": v for k, v in seeding.state().items()},
            "torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": list(_pyrandom.getstate()),
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


def load(path: str, fp: dict) -> dict:
    """Read a checkpoint of the run ``fp`` and restore the random states; returns its contents."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != _FORMAT:
        raise CheckpointMismatch(f"{path} is not an svi checkpoint of this version; delete it or use another "
                                 "checkpoint_dir")
    saved = state["fingerprint"]
    if saved != fp:
        diff = sorted(k for k in set(saved) | set(fp) if saved.get(k) != fp.get(k))
        raise CheckpointMismatch(
            f"{path} holds a checkpoint of a different run (it differs in: {', '.join(diff)}); resuming it "
            "would continue the other run's training. Restart with the same model, context, model kwargs, "
            "LM and options to resume, or delete it / choose another checkpoint_dir")
    rng = state["rng"]
    states = {}
    for key, st in rng["ppl_lm"].items():
        dev, idx = key.split(":")
        states[(dev, int(idx) if idx else None)] = st
    seeding.set_state(states)
    torch.set_rng_state(rng["torch"])
    _set_numpy_state(rng["numpy"])
    _pyrandom.setstate(tuple(rng["python"]))
    return state
