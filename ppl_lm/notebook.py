"""The set-up every tutorial notebook shares: ``SMOKE = ppl_lm.notebook.setup()``.

* one torch thread by default: on a shared CPU, two threads per process spin-wait on each other
  and ran many times slower; set ``PPL_LM_THREADS`` on a machine of your own;
* ``PPL_LM_SMOKE=1`` runs the notebook on tiny random LMs in seconds (how CI runs them);
* the log line that bitsandbytes (imported by peft) prints on CPU is silenced;
* the mode is printed first, so a committed notebook shows which run its outputs come from.
"""

from __future__ import annotations

import logging
import os

__all__ = ["setup", "smoke"]


def smoke() -> bool:
    """Whether the notebooks run in smoke mode (``PPL_LM_SMOKE=1``: tiny random LMs)."""
    return os.environ.get("PPL_LM_SMOKE") == "1"


def setup() -> bool:
    """Apply the shared set-up and return whether this is a smoke run."""
    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("PPL_LM_THREADS", "1")))
    print("mode:", "smoke (tiny LMs)" if smoke() else "real (SmolLM2-135M-Instruct)")
    return smoke()
