"""TEMPLATE: a new inference backend in one file (importable, not registered in ``METHODS``).

Copy this file to ``inference/<name>.py`` and replace the part of :func:`run` marked
"the algorithm". What is here runs as it stands: the simplest correct backend, self-normalised
importance sampling with the prior as proposal, so a copy works before anything is changed.
``docs/ARCHITECTURE.md`` ("Adding a backend") explains where it sits.

The contract every backend keeps:

1. **One signature, described.** ``run(model, *args, seed=0, model_kwargs=None, <named options>)
   -> Posterior``, decorated by ``@describe(kind=..., info=...)`` (:mod:`ppl_lm.backends`): the
   kind of its draws (``Kind.EXACT``, ``Kind.WEIGHTED``, ``Kind.MCMC``; the diagnostics, the
   report and the CLI read it, never the backend's name) and its Info type. Options are
   keyword-only, each with an annotation, a default and a line in ``Args:``; that is the one
   place an option is written: the options dataclass, the CLI flag (``--num-samples``) and its
   help are made from it. Put the checks in the annotation (``PositiveInt``, ``AtLeastTwo``,
   ``Fraction``, ``Literal[...]`` from :mod:`ppl_lm.validation`): they run before any work, in
   ``infer``, in a direct ``run(...)`` call and in the CLI before the LM loads. Check anything
   else first thing in ``run``, with an error that names the option and the fix. Accept
   ``progress`` (the tests turn bars off). Spell options as the other backends do
   (``num_samples``, ``num_particles``, ``num_chains``, ``chunk_size``).
2. **Read the model only through** :mod:`ppl_lm.inference._runtime`: :func:`latent_sites` (which
   sites the model has; :func:`single_sequence_site` when the backend handles exactly one
   ``lm.sequence`` site), :func:`run_model` (one vectorised run inside the particle plate, each
   site scored per particle by the runtime's one rule; ``data=`` fixes latent values,
   ``guide_trace=`` replays a proposal), then :func:`make_posterior` and :func:`finish` (typed
   warnings, raised at the user's line). Do not trace or score the model by hand.
3. **Randomness** comes from ``seeding.seeded(seed)`` only: same seed, same result on CPU.
4. **Typed diagnostics.** Fill the ``Posterior`` fields that are defined for the method, each
   computed by :mod:`ppl_lm.diagnostics.estimators` (``log_evidence_se``, ``khat`` for weights;
   ``rhat``, ``bulk_ess`` for chains); leave the others ``None``. ``post.ess`` follows from them.
   Facts of the run that are not diagnostics go in a frozen :class:`~ppl_lm.posterior.Info`
   subclass (:class:`TemplateInfo` here), never in a dict of string keys.
5. **Register and test it.** One line in ``BUILTIN`` in ``ppl_lm/backends.py`` (or, outside the
   project, ``ppl_lm.backends.register("<name>", "<module>")``); then ``ppl_lm.infer(model,
   method="<name>")``, ``ppl-lm run/compare --method <name>`` with its flags, the report and
   ``to_inference_data`` work (``tests/test_template.py`` proves it on a copy of this file). Add a
   row to ``BACKENDS`` in
   ``tests/test_conformance.py``, e.g. for this one::

       "<name>": Row(dict(num_samples=20_000), lambda f: 20_000 * f, 20_000),

   that is: the options of the test run; the number of independent exact draws its answer must
   be as good as, given the problem's exact prior-IS ESS fraction ``f``; the prior-IS sample size
   whose log-Z error it must match (0 when it gives no log Z). The table then checks it against
   exact enumeration on every toy problem and both toy LMs, and shows that planted bugs fail it.
   Put its own edge cases and errors in ``tests/test_<name>.py``, and a line in the README's table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ppl_lm import seeding
from ppl_lm.backends import Kind, describe
from ppl_lm.diagnostics.estimators import log_evidence_se, log_mean_exp, pareto_khat
from ppl_lm.inference._runtime import cat_scores, finish, latent_sites, make_posterior, run_model
from ppl_lm.posterior import Info, Posterior
from ppl_lm.validation import PositiveInt

__all__ = ["run", "TemplateInfo"]

METHOD = "template"  # the name in METHODS, Posterior.method and warnings


@dataclass(frozen=True)
class TemplateInfo(Info):
    """Facts of a run that are not diagnostics (``post.info.num_samples``)."""

    num_samples: int = 0
    chunk_size: int = 0


@describe(kind=Kind.WEIGHTED, info=TemplateInfo)
def run(model, *args, seed: int = 0, model_kwargs: dict | None = None, num_samples: PositiveInt = 1000,
        chunk_size: PositiveInt = 1024, progress: bool = True) -> Posterior:
    """Self-normalised importance sampling with the prior as proposal (the template's algorithm).

    Args:
        model: a vectorised Pyro model; ``*args`` and ``model_kwargs`` are its arguments.
        seed: same seed, same samples (on CPU).
        num_samples: number of prior draws.
        chunk_size: particles per vectorised model run (bounds memory).
        progress: show a progress bar.

    Returns:
        A :class:`Posterior` with ``log_evidence`` (log mean weight), ``log_evidence_se``,
        ``khat`` and a :class:`TemplateInfo`.

    Raises:
        ValueError: a bad option value, or no sample satisfies the condition.

    >>> import torch, pyro, ppl_lm
    >>> from ppl_lm.inference import TEMPLATE
    >>> lm = ppl_lm.MarkovLM.random(4, eos_id=0, seed=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
    ...     ppl_lm.reward("bs", (x == 2).float().sum(-1), beta=1.0)
    >>> post = TEMPLATE.run(model, num_samples=2000, progress=False)
    >>> exact = ppl_lm.infer(model, method="exact")
    >>> abs(post.log_evidence - exact.log_evidence) < 0.1  # 4 exact standard errors at N = 2000
    True
    >>> type(post.info).__name__, post.info.num_samples, post.rhat is None
    ('TemplateInfo', 2000, True)
    """
    # 1. Option values were checked by @describe, from their annotations, before this line.
    kwargs = dict(model_kwargs or {})

    with seeding.seeded(seed), torch.no_grad():
        # 2. The model's sites (placeholder=True: no LM call, only names and distributions).
        sites = latent_sites(model, args, kwargs, placeholder=True)

        # 3. The algorithm: replace from here ...
        parts, log_ws = [], []
        with tqdm(total=num_samples, desc=METHOD, unit="sample", disable=not progress) as bar:
            for start in range(0, num_samples, chunk_size):
                n = min(chunk_size, num_samples - start)
                # Prior draws of every latent site, every site scored per particle. With the
                # prior as proposal the weight is the likelihood: log p(x) cancels.
                scores = run_model(model, args, kwargs, n)
                scores.trace = None  # keep values and per-particle scalars only
                parts.append(scores)
                log_ws.append(scores.log_likelihood.double())
                bar.update(n)
        scores, log_w = cat_scores(parts), torch.cat(log_ws)
        # ... to here: leave ``scores`` (the values of every latent site) and ``log_w``.

    # 4. The Posterior: weights normalised by make_posterior, typed diagnostics, typed info.
    log_z = float(log_mean_exp(log_w))
    post = make_posterior(METHOD, scores, log_w, sites, log_evidence=log_z,
                          log_evidence_se=log_evidence_se(log_w), khat=pareto_khat(log_w),
                          info=TemplateInfo(num_samples=num_samples, chunk_size=chunk_size))
    return finish(post)
