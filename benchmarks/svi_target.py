"""The SmolLM2 target of SVI: KL(q‖π′) and KL(π′‖q) against training time, per objective.

Problem (issue 15): SmolLM2-135M-Instruct, ``models/sentiment.py`` (prompt "I watched the new
movie last night and", r = VADER compound sentiment, β = 0.25), 12 new tokens, LoRA r = 8
(α = 16, q_proj/v_proj), CPU, one thread. Target: KL(q‖π′) ≤ 0.2 nats within 10 minutes of training,
from ≈ 0.92 at the prior.

Yardstick, fixed before training and shared by every objective (common random numbers):

- ``log Ẑ_ref``: prior importance sampling with ``--ref-samples`` draws (seed fixed);
- every ``--eval-every`` seconds of training (CPU time of the training thread: the machine is
  shared, so wall time would count other processes; the clock stops while evaluating), the guide
  draws ``--eval-samples`` fresh sequences under one fixed seed and
  ``KL(q‖π′) = log Ẑ_ref − ELBO`` (se from both), the guide-IS estimate of KL(π′‖q) on the same
  draws, and ``KL(π′‖q)`` on the reference's prior draws (self-normalised weights e^{r/β},
  the mass-covering check: it sees mass the guide never proposes; at the start and the end only,
  it costs a pass over all reference draws).

The training trace's own windowed estimates (free: from the training draws) are printed too.
Results: one JSON line per objective (benchmarks/out/svi_target.jsonl), CSV and a figure of
both KLs against training time (benchmarks/out/svi_target.{csv,png}).

    python benchmarks/svi_target.py --threads 1                     # reverse and forward, 10 min each
    python benchmarks/svi_target.py --objectives forward --minutes 2
    python benchmarks/svi_target.py --minutes 2.5 --variants "reverse;reverse:lr=5e-3;reverse:particles=16"

A variant is ``OBJECTIVE[:key=value,...]`` with keys ``lr``, ``lr_decay``, ``particles``,
``targets`` (LoRA target modules, ``+``-separated or ``all-linear``), ``clip`` and ``proposal``
(``guide``, ``prior`` or ``mixture``, e.g. ``forward:proposal=mixture``): the ablation
pilots run in one process on one reference. The reference draws are cached in
``benchmarks/out/`` (keyed by their size, seed, β and length) so pilots in several processes
share them.
    python benchmarks/svi_target.py --smoke                         # tiny LM, seconds
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

EVAL_SEED, REF_SEED = 2024, 7
VARIANT_KEYS = {"lr": float, "lr_decay": float, "particles": int, "targets": str, "clip": float, "proposal": str}


def parse_variants(spec: str, particles: int) -> list[tuple[str, str, dict]]:
    """``"reverse;forward:lr=5e-3,particles=16"`` -> [(label, objective, options)]."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        objective, _, rest = item.partition(":")
        opts: dict = {"particles": particles}
        for kv in filter(None, rest.split(",")):
            k, _, v = kv.partition("=")
            if k not in VARIANT_KEYS:
                raise SystemExit(f"unknown variant key {k!r} in {item!r}; use {', '.join(VARIANT_KEYS)}")
            opts[k] = VARIANT_KEYS[k](v)
        out.append((item, objective, opts))
    return out


def _score(lm, prompt, x: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``lm.score`` in blocks of ``rows`` sequences (float64): one pass over 2048 draws holds their
    [2048, T, V] logits and log-probs at once, ≈ 10 GB on SmolLM2 (the OOM killer took such a run)."""
    return torch.cat([lm.score(prompt, x[i : i + rows]).double() for i in range(0, len(x), rows)])


def _se_mean(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


class Yardstick:
    """Fixed reference draws from the prior and a fixed evaluation seed, for every objective."""

    def __init__(self, ppl_lm, model, lm, prompt, n_ref, n_eval, beta, T, progress, cache=None, n_forward=None):
        from ppl_lm.inference.svi.kl import kl_estimates

        self.ppl_lm, self.model, self.lm, self.prompt = ppl_lm, model, lm, prompt
        self.n_eval, self.beta, self.T = n_eval, beta, T
        self.kl_estimates = kl_estimates
        t0 = time.perf_counter()
        if cache is not None and os.path.exists(cache):
            ref = torch.load(cache)
        else:
            post = ppl_lm.infer(model, prompt, method="importance", num_samples=n_ref, seed=REF_SEED,
                                progress=progress)
            ref = {"x": post.samples, "r": post.stats["reward:sentiment"].double(),
                   "log_prior": _score(lm, prompt, post.samples),
                   "log_z": float(post.log_evidence), "log_z_se": float(post.log_evidence_se)}
            if cache is not None:
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                torch.save(ref, cache)
        self.seconds = time.perf_counter() - t0
        self.x, self.r, self.log_prior = ref["x"], ref["r"], ref["log_prior"]
        self.log_z, self.log_z_se = ref["log_z"], ref["log_z_se"]
        # KL(π′‖q) on the first n_forward reference draws (a guide pass over each: costly)
        k = len(self.x) if n_forward is None else min(n_forward, len(self.x))
        self.fx, self.fr, self.flp = self.x[:k], self.r[:k], self.log_prior[:k]
        w = torch.softmax(self.r / beta, 0)
        self.kl_at_prior = (self.log_z - float(self.r.mean()) / beta,
                            math.hypot(self.log_z_se, float(self.r.std()) / math.sqrt(len(self.r)) / beta))
        self.ess = float(1 / (w**2).sum())

    @torch.no_grad()
    def __call__(self, guide_lm, full: bool = True) -> dict:
        """The yardstick for one guide; ``full=False`` skips the costly pass over the reference draws."""
        ppl_lm = self.ppl_lm
        with ppl_lm.seeding.seeded(EVAL_SEED):
            x, lq = guide_lm.sample(self.prompt, self.n_eval, self.T,
                                    generator=ppl_lm.seeding.generator(guide_lm.device))
        log_q = lq.sum(-1).double()
        log_p = _score(self.lm, self.prompt, x)
        r = ppl_lm.rewards.sentiment(self.lm, x).double()
        f = log_p + r / self.beta - log_q
        elbo, elbo_se = _se_mean(f)
        kl_rev, kl_rev_se = self.log_z - elbo, math.hypot(self.log_z_se, elbo_se)
        own = self.kl_estimates(log_q, log_p, r / self.beta)
        # KL(π′‖q) on the prior reference draws: Σ w̄ (log π + r/β − log q) − log Ẑ, w̄ ∝ e^{r/β}
        nan = float("nan")
        ref = None
        if full:
            lq_ref = _score(guide_lm, self.prompt, self.fx)
            ref = self.kl_estimates(lq_ref, self.flp, self.fr / self.beta, log_proposal=self.flp)
        return {"elbo": elbo, "elbo_se": elbo_se, "kl_reverse": kl_rev, "kl_reverse_se": kl_rev_se,
                "kl_reverse_guide_is": own.kl_reverse, "kl_reverse_guide_is_se": own.kl_reverse_se,
                "kl_forward_guide_is": own.kl_forward, "kl_forward_guide_is_se": own.kl_forward_se,
                "kl_forward_prior_is": ref.kl_forward if ref else nan,
                "kl_forward_prior_is_se": ref.kl_forward_se if ref else nan,
                "reward": float(r.mean()), "kl_prior": float((log_q - log_p).mean())}


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--objectives", default="reverse,forward", help="comma-separated: reverse, forward, ...")
    p.add_argument("--variants", default=None,
                   help="semicolon-separated OBJECTIVE[:key=value,...] (keys: lr, lr_decay, particles, targets, "
                        "clip); replaces --objectives")
    p.add_argument("--forward-ref-draws", type=int, default=None,
                   help="KL(π′‖q) on the first this many reference draws (default all)")
    p.add_argument("--figure", default=None, help="also save the figure here (e.g. benchmarks/figures/...png)")
    p.add_argument("--minutes", type=float, default=None, help="training time per objective (default 10)")
    p.add_argument("--eval-every", type=float, default=None, help="seconds of training between evaluations")
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--ref-samples", type=int, default=None)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default: the LoRA default of method='svi'")
    p.add_argument("--lr-decay", type=float, default=None)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--beta", type=float, default=0.25)
    args = p.parse_args(argv)
    _bench.setup(args)
    minutes = args.minutes or (0.1 if args.smoke else 10.0)
    eval_every = args.eval_every or (3.0 if args.smoke else 120.0)
    n_eval = args.eval_samples or (16 if args.smoke else 256)
    n_ref = args.ref_samples or (32 if args.smoke else 2048)

    from ppl_lm.models import sentiment

    import ppl_lm

    lm = ppl_lm.tiny_char_transformer(seed=0) if args.smoke else _bench.smollm2(args)
    model = sentiment.build(lm, beta=args.beta, max_new_tokens=args.tokens)
    prompt = sentiment.context
    os.system("uptime")
    cache = None if args.smoke or args.config_only else os.path.join(
        _bench.OUT_DIR, f"svi_target_ref_{n_ref}_{REF_SEED}_{args.beta}_{args.tokens}.pt")
    ys = Yardstick(ppl_lm, model, lm, prompt, n_ref, n_eval, args.beta, args.tokens, progress=False, cache=cache,
                   n_forward=args.forward_ref_draws)
    print(f"reference: prior IS, {n_ref} draws, {ys.seconds:.0f} s: log Ẑ = {ys.log_z:.4f} ± {ys.log_z_se:.4f}, "
          f"ESS {ys.ess:.0f}; KL(π‖π′) = {ys.kl_at_prior[0]:.3f} ± {ys.kl_at_prior[1]:.3f}", flush=True)

    rows = []
    at_prior = ys(lm)  # the guide starts equal to the prior: one evaluation serves every variant
    spec = args.variants or ";".join(args.objectives.split(","))
    for label, objective, v in parse_variants(spec, args.particles):
        opts = dict(objective=objective, guide="lora", num_particles=v["particles"], num_samples=n_eval,
                    log_evidence_ref=ys.log_z, progress=False, seed=args.seed)
        lr = v.get("lr", args.lr)
        if lr:
            opts["lr"] = lr
        decay = v.get("lr_decay", args.lr_decay)
        if decay:
            opts["lr_decay"] = decay
        if "targets" in v:
            opts["lora_targets"] = v["targets"] if v["targets"] == "all-linear" else v["targets"].split("+")
        if "clip" in v:
            opts["clip_norm"] = v["clip"]
        if "proposal" in v:  # whose draws train the guide: "guide", "prior" or "mixture" (taught.py)
            opts["proposal"] = v["proposal"]
        # seconds per step from a short probe, so that num_steps (and the lr schedule) fits the budget
        probe = ppl_lm.infer(model, prompt, method="svi", num_steps=3, **{**opts, "num_samples": 2, "crosscheck_samples": 0})
        cpu = np.diff(np.concatenate([[0.0], probe.info.trace["cpu_seconds"]]))
        s_step = float(sorted(cpu)[1])  # CPU seconds of one thread per step (the machine is shared)
        num_steps = max(2, int(minutes * 60 / s_step))
        print(f"[{label}] {s_step:.2f} CPU s/step in the probe -> {num_steps} steps", flush=True)
        curve = [(0, 0.0, dict(at_prior))]
        state = {"next": eval_every}

        def callback(step, guide, stats, _curve=curve, _state=state, num_steps=num_steps):
            t = float(stats["cpu_seconds"])
            if t >= _state["next"] or step == num_steps:
                _curve.append((step, t, ys(guide.lm, full=step == num_steps)))
                _state["next"] = t + eval_every
                e = _curve[-1][2]
                print(f"  step {step:4d}  {t:6.0f} CPU s ({stats['seconds']:.0f} s wall)  KL(q‖π′) {e['kl_reverse']:.3f} ± {e['kl_reverse_se']:.3f}  "
                      f"KL(π′‖q) {e['kl_forward_prior_is']:.3f} ± {e['kl_forward_prior_is_se']:.3f} (prior IS), "
                      f"{e['kl_forward_guide_is']:.3f} (guide IS)  E r {e['reward']:+.3f}  KL(q‖π) {e['kl_prior']:.3f}",
                      flush=True)

        t0 = time.perf_counter()
        post = ppl_lm.infer(model, prompt, method="svi", num_steps=num_steps, callback=callback, **opts)
        wall = time.perf_counter() - t0
        info = post.info
        kt = info.kl_trace
        cpu_total = float(post.info.trace["cpu_seconds"][-1])
        hit = next((c[1] for c in curve if c[2]["kl_reverse"] <= 0.2), float("nan"))
        print(f"[{label}] {num_steps} steps, training {cpu_total:.0f} CPU s, {info.train_time:.0f} s wall "
              f"(wall with evaluations {wall:.0f} s); "
              f"first evaluation with KL(q‖π′) ≤ 0.2 at {hit:.0f} CPU s; warnings: "
              f"{[w.code for w in post.warnings] or 'none'}", flush=True)
        for i in sorted({int(j) for j in np.linspace(0, len(kt.step) - 1, 11)}):
            print(f"    window to step {int(kt.step[i]):4d}: KL(q‖π′) {kt.kl_reverse[i]:.3f} ± {kt.kl_reverse_se[i]:.3f}, "
                  f"KL(π′‖q) {kt.kl_forward[i]:.3f} ± {kt.kl_forward_se[i]:.3f}")
        rows.append({"objective": label, "options": v, "num_steps": num_steps, "train_time": info.train_time,
                     "train_cpu_seconds": cpu_total,
                     "seconds_per_step": info.seconds_per_step, "lr": info.lr, "curve": curve,
                     "warnings": [w.code for w in post.warnings], "first_below_0.2_s": hit,
                     "kl_trace": {k: getattr(kt, k).tolist() for k in ("step", "seconds", "kl_reverse",
                                                                        "kl_reverse_se", "kl_forward",
                                                                        "kl_forward_se")}})
    os.system("uptime")
    os.makedirs(_bench.OUT_DIR, exist_ok=True)
    with open(os.path.join(_bench.OUT_DIR, "svi_target.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        keys = sorted(rows[0]["curve"][0][2])
        w.writerow(["objective", "step", "train_time_s", *keys])
        for row in rows:
            for step, t, e in row["curve"]:
                w.writerow([row["objective"], step, f"{t:.2f}", *(f"{e[k]:.5f}" for k in keys)])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
        for i, row in enumerate(rows):
            c = row["curve"]
            t = [x[1] for x in c]
            ax[0].errorbar(t, [x[2]["kl_reverse"] for x in c], yerr=[x[2]["kl_reverse_se"] for x in c],
                           color=f"C{i}", capsize=2, marker="o", label=row["objective"])
            full = [x for x in c if x[2]["kl_forward_prior_is"] == x[2]["kl_forward_prior_is"]]
            ax[1].errorbar([x[1] for x in full], [x[2]["kl_forward_prior_is"] for x in full],
                           yerr=[x[2]["kl_forward_prior_is_se"] for x in full], color=f"C{i}", capsize=2,
                           marker="o", label=f"{row['objective']} (prior-IS reference draws)")
            ax[1].plot(t, [x[2]["kl_forward_guide_is"] for x in c], color=f"C{i}", ls=":", marker="x",
                       label=f"{row['objective']} (guide IS, fresh draws)")
        ax[0].axhline(0.2, color="k", ls="--", lw=1, label="target 0.2")
        ax[0].set_title("KL(q‖π′) = log Ẑ_ref − ELBO")
        ax[0].set_ylim(bottom=0)
        ax[1].set_title("KL(π′‖q)")
        for a in ax:
            a.set_xlabel("training time (CPU seconds, one thread)")
            a.set_ylabel("nats")
            a.legend()
        fig.suptitle(f"SmolLM2-135M, sentiment, β={args.beta}, {args.tokens} tokens, LoRA r=8, "
                     f"{args.particles} draws/step")
        fig.tight_layout()
        fig.savefig(os.path.join(_bench.OUT_DIR, "svi_target.png"), dpi=110)
        if args.figure:
            fig.savefig(args.figure, dpi=110)
    except Exception as err:  # the plot is a convenience; the CSV holds the data
        print(f"(no plot: {err})")
    _bench.emit("svi_target", {"args": vars(args), "reference": {"log_z": ys.log_z, "log_z_se": ys.log_z_se,
                                                               "n": len(ys.x), "n_forward": len(ys.fx),
                                                               "kl_at_prior": ys.kl_at_prior, "ess": ys.ess},
                               "rows": rows})


if __name__ == "__main__":
    main()
