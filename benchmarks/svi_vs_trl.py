"""KL-regularised fine-tuning toward positive sentiment: ppl-lm SVI vs TRL's RLOO trainer.

The same problem on both sides: SmolLM2-135M, prompt "I watched the new movie last night
and", 12 new tokens, reward r = VADER compound sentiment of the continuation, β = 0.25,
objective J(q) = E_q[r] − β·KL(q‖π) (π: the frozen LM), LoRA r=8, α=16 on q_proj/v_proj, 8
completions per step, 30 steps, Adam at the same peak step size (``--lr``, 2e-3) and the same
global gradient-norm clip (1.0), each side with its own default schedule: ours decays the step
size geometrically by ``--lr-decay`` (0.1) over the run, TRL uses transformers' default linear
decay (``--trl-scheduler``).

- ours: ``ppl_lm.infer(model, prompt, method="svi", objective="reverse", guide="lora", ...)``;
  the model is ``ppl_lm.reward("sentiment", r, beta=β)`` so the ELBO is J/β.
- TRL: ``RLOOTrainer`` with ``RLOOConfig(beta=β, num_generations=8, per_device_train_batch_size=8,
  max_completion_length=12, num_iterations=1, top_k=0, top_p=1, temperature=1,
  max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, use_cpu=True)``. Its reward is
  r − β·Σ_t log(q/π) (sequence KL), its advantage the same RLOO leave-one-out baseline, so its
  gradient is β × ours (Adam is scale-free).

Time is the training thread's CPU time (``time.thread_time``; one torch thread), not wall time:
the machine is shared, and wall time would count other processes.

Measuring J: every ``--eval-every`` steps (and at step 0) each policy is evaluated off the
training clock on ``--eval-samples`` fresh samples, J = mean(r − β·(log q − log π)), with the
same sampling noise at every evaluation (common random numbers; at step 0 both policies are
the LM itself, so both curves start at the same value). Ours evaluates in the ``callback`` of
``method="svi"``, TRL in a ``TrainerCallback``. Two yardsticks that one noisy evaluation does
not decide (:func:`yardsticks`): the mean J over the second half of the shorter run's training
time, for both at equal time; and the time each method's running mean (3 evaluations) takes to
reach TRL's final level (the mean of its last 3 evaluations), whose ratio is the speed-up at
equal J. Per-step training-batch estimates go to the CSV too.

Each side runs in its own fresh process (``_procs.run_worker``; issue 24: a peer sharing our
process ran slower), one torch thread each: ours loads SmolLM2 with ``ppl_lm.load_lm``, TRL reads
the same float32 weights from the folder ``load_lm`` writes for the embedded GGUF with
``AutoModelForCausalLM.from_pretrained`` (the transformers way TRL's docs load a model; there is
no hub here; transformers' Trainer refuses the GGUF-marked module itself). The processes alternate
ours / TRL / TRL / ours ... over ``--repeats`` (3; seeds differ per repeat). Curves go to
benchmarks/out/svi_vs_trl.csv and .png.

    python benchmarks/svi_vs_trl.py --threads 1    # 30 steps, 3 repeats
    python benchmarks/svi_vs_trl.py --smoke        # tiny: 3 steps on SmolLM2, 1 repeat
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402
import _procs  # noqa: E402

PROMPT = "I watched the new movie last night and"
EVAL_SEED = 12345  # the same sampling noise at every evaluation (common random numbers)


def vader(texts):
    from ppl_lm.rewards import _vader

    return [float(_vader().polarity_scores(t)["compound"]) for t in texts]


def running_mean(x, w=5):
    x = np.asarray(x, dtype=float)
    return np.array([x[max(0, i - w + 1): i + 1].mean() for i in range(len(x))])


def evaluate(q_lm, p_lm, beta, T, M, seed, reward=None):
    """J = mean(r − β(log q − log π)) over M fresh samples from q, with its standard error.

    ``reward(lm, x)``: token ids ``[M, T]`` -> ``[M]`` (default: VADER sentiment)."""
    from ppl_lm import rewards

    g = torch.Generator().manual_seed(seed)
    prompt = q_lm.encode(PROMPT)
    with torch.no_grad():
        x, lq = q_lm.sample(prompt, M, T, generator=g)
        lp = p_lm.score(prompt, x)
    r = (reward or rewards.sentiment)(p_lm, x).double()
    kl = lq.sum(-1).double() - lp.double()
    j = r - beta * kl
    return {"J": float(j.mean()), "J_se": float(j.std() / math.sqrt(M)), "reward": float(r.mean()),
            "kl": float(kl.mean())}


def run_ours(lm, args, seed, reward=None):
    """``method="svi"``, the guide evaluated every ``--eval-every`` steps in its ``callback``,
    off the training clock. ``train_time`` counts the optimisation steps only.

    ``reward(lm, x)``: the reward (default: VADER sentiment), as in :func:`evaluate`.
    """
    import ppl_lm
    from ppl_lm import rewards

    beta, T = args.beta, args.tokens
    reward = reward or rewards.sentiment

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.reward("sentiment", reward(lm, x), beta=beta)
        return x

    pyro.clear_param_store()
    curve = [(0, 0.0, evaluate(lm, lm, beta, T, args.eval_samples, EVAL_SEED, reward))]
    wall0 = time.perf_counter()

    def on_step(step, guide, stats):  # off the training clock
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, stats["cpu_seconds"], evaluate(guide.lm, lm, beta, T, args.eval_samples, EVAL_SEED,
                                                               reward)))

    post = ppl_lm.infer(model, PROMPT, method="svi", objective="reverse", guide="lora", num_steps=args.steps,
                        num_particles=args.particles, lr=args.lr, lr_decay=args.lr_decay, clip_norm=args.clip_norm,
                        lora_r=8, lora_alpha=16, num_samples=2, crosscheck_samples=0, seed=seed, progress=False,
                        callback=on_step)
    tr = post.info.trace
    train_s = float(tr["cpu_seconds"][-1])
    J = np.asarray(tr["reward:sentiment"]) - beta * np.asarray(tr["kl_prior"])
    return {"J": J, "reward": np.asarray(tr["reward:sentiment"]), "kl": np.asarray(tr["kl_prior"]),
            "curve": curve, "train_s": train_s,
            "other_s": time.perf_counter() - wall0 - train_s}  # setup, evaluations, the correction


def run_trl(base_model, tokenizer, args, seed, reward=None):
    """TRL's ``RLOOTrainer`` on the same problem; ``reward(lm, x)`` as in :func:`evaluate` (default:
    VADER sentiment, scored on the decoded completions)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    from ppl_lm import TransformersLM

    model = copy.deepcopy(base_model)
    for p in model.parameters():
        p.requires_grad_(False)
    base_lm = TransformersLM(model, tokenizer)
    curve = [(0, 0.0, evaluate(base_lm, base_lm, args.beta, args.tokens, args.eval_samples, EVAL_SEED, reward))]
    clock = {"t0": None, "paused": 0.0}

    def now():  # CPU time of the training thread (the machine is shared), evaluations excluded
        return time.thread_time() - clock["t0"] - clock["paused"]

    class EvalClock(TrainerCallback):
        """Evaluates the policy every ``eval_every`` steps, off the training clock."""

        def on_train_begin(self, a, state, control, **kw):
            clock["t0"] = time.thread_time()

        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step % args.eval_every and state.global_step != args.steps:
                return
            t = now()
            p0 = time.thread_time()
            peft_model = trainer.model
            was_training = peft_model.training
            peft_model.eval()
            q_lm = TransformersLM(peft_model.get_base_model(), tokenizer)
            ev = evaluate(q_lm, RefLM(peft_model, tokenizer), args.beta, args.tokens, args.eval_samples,
                          EVAL_SEED, reward)
            peft_model.train(was_training)
            curve.append((state.global_step, t, ev))
            clock["paused"] += time.thread_time() - p0

    def sentiment_reward(completions, completion_ids=None, **kw):
        if reward is None:
            return vader(completions)
        T = args.tokens  # our reward reads token ids [N, T], EOS-padded, as our samples are
        x = torch.full((len(completion_ids), T), base_lm.eos_id, dtype=torch.long)
        for i, ids in enumerate(completion_ids):
            ids = list(ids)[:T]
            x[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return reward(base_lm, x).double().tolist()

    out = tempfile.mkdtemp(prefix="trl_")
    cfg = RLOOConfig(
        output_dir=out, beta=args.beta, num_generations=args.particles,
        per_device_train_batch_size=args.particles, max_completion_length=args.tokens,
        num_iterations=1, temperature=1.0, top_k=0, top_p=1.0, learning_rate=args.lr,
        lr_scheduler_type=args.trl_scheduler, warmup_steps=0, weight_decay=0.0, max_grad_norm=args.clip_norm,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=seed,
        disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=False,
    )
    ds = Dataset.from_dict({"prompt": [PROMPT] * args.steps})
    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          bias="none", task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = RLOOTrainer(model=model, reward_funcs=sentiment_reward, args=cfg, train_dataset=ds,
                          processing_class=tokenizer, peft_config=peft_cfg, callbacks=[EvalClock()])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; they stay in state.log_history
    setup = time.perf_counter() - t0
    trainer.train()
    train_s = curve[-1][1]
    logs = [h for h in trainer.state.log_history if "reward" in h and "kl" in h]
    reward = np.array([h["reward"] for h in logs])
    kl_seq = np.array([h["kl"] * h["completions/mean_length"] for h in logs])
    J = reward - args.beta * kl_seq
    return {"J": J, "reward": reward, "kl": kl_seq, "curve": curve, "train_s": train_s, "other_s": setup}


class RefLM:
    """π for the TRL policy: the same network with the adapter disabled (scoring only)."""

    def __init__(self, peft_model, tokenizer):
        from ppl_lm import TransformersLM

        self.peft_model = peft_model
        self.lm = TransformersLM(peft_model.get_base_model(), tokenizer)
        self.eos_id = self.lm.eos_id

    def score(self, prompt, tokens):
        with self.peft_model.disable_adapter():
            return self.lm.score(prompt, tokens)

    def decode(self, ids):
        return self.lm.decode(ids)


def plain_copy(model):
    """The same weights in a plain (non-GGUF) transformers model.

    The embedded model is loaded from a GGUF file, dequantised to float32, but transformers
    still marks it quantised and its Trainer refuses to fine-tune it; TRL gets this copy.
    """
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"weights do not transfer: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain.eval()


def smoothed(curve, k=3):
    """(time, J) of the evaluated curve, J a running mean over the last ``k`` evaluations."""
    ts = [c[1] for c in curve]
    js = [c[2]["J"] for c in curve]
    return ts, [float(np.mean(js[max(0, i - k + 1): i + 1])) for i in range(len(js))]


def yardsticks(o, t):
    """Noise-robust comparisons of two evaluated curves (common random numbers in every evaluation).

    - Equal training time T = the shorter run's: the mean J over the evaluations in [T/2, T]
      (several evaluations of 128 samples each: its se is the se of that mean).
    - Equal J: J* = TRL's final level (the mean of its last 3 evaluations); the time at which
      each method's running mean over 3 evaluations first reaches J*; the speed-up is the ratio.
    """
    T = min(o["train_s"], t["train_s"])

    def half(r):
        pts = [c[2] for c in r["curve"] if T / 2 <= c[1] <= T + 1e-9]
        js = np.array([p["J"] for p in pts])
        se = math.sqrt(sum(p["J_se"] ** 2 for p in pts)) / len(pts) if pts else float("nan")
        return (float(js.mean()) if len(js) else float("nan")), se

    target = float(np.mean([c[2]["J"] for c in t["curve"][-3:]]))
    to = time_to_smoothed(o["curve"], target)
    tt = time_to_smoothed(t["curve"], target)
    (oj, ojs), (tj, tjs) = half(o), half(t)
    return {"equal_time": T, "ours_J_half": oj, "ours_J_half_se": ojs, "trl_J_half": tj, "trl_J_half_se": tjs,
            "target_J": target, "ours_time_to_target": to, "trl_time_to_target": tt,
            "speedup_time_to_target": tt / to if to > 0 else float("nan")}


def time_to_smoothed(curve, target):
    ts, js = smoothed(curve)
    return time_to([(0, a, {"J": b}) for a, b in zip(ts, js)], target)


def time_to(curve, target):
    """First training time at which the evaluated curve reaches ``target`` (linear interpolation)."""
    ts = [c[1] for c in curve]
    js = [c[2]["J"] for c in curve]
    if math.isnan(target):
        return float("nan")
    for i, j in enumerate(js):
        if j >= target:
            if i == 0:
                return 0.0
            f = (target - js[i - 1]) / (j - js[i - 1])
            return float(ts[i - 1] + f * (ts[i] - ts[i - 1]))
    return float("nan")


def w_ours(args):
    lm = _bench.smollm2(args)
    return run_ours(lm, args, args.seed)


def w_trl(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model_dir is None:  # --config-only: random weights that only ours' loader builds
        lm = _bench.smollm2(args)
        model, tokenizer = plain_copy(lm.model), lm.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=_bench.dtype_of(args)).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return run_trl(model, tokenizer, args, args.seed)


WORKERS = {"ours": w_ours, "trl": w_trl}


def float_weights_dir(args):
    """The folder of float weights ``ppl_lm.load_lm`` writes for the embedded GGUF (loading once makes
    sure it is there); ``None`` with ``--config-only``."""
    if args.config_only:
        return None
    from ppl_lm.lm.hf import EMBEDDED_GGUF, cache_entry, embedded_model_dir

    folder = str(cache_entry(str(embedded_model_dir()), EMBEDDED_GGUF))
    if not os.path.isdir(folder):
        _bench.smollm2(args)
    if not os.path.isdir(folder):
        sys.exit(f"the float weights {folder} are missing (PPL_LM_CACHE off?): TRL's process loads them")
    return folder


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default 30)")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--beta", type=float, default=0.25)
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam step size, both sides")
    p.add_argument("--lr-decay", type=float, default=0.1, help="ours: the step size shrinks by this over the run")
    p.add_argument("--trl-scheduler", default="linear", help="TRL's lr_scheduler_type (transformers' default: linear)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip, both sides")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 5)")
    p.add_argument("--eval-samples", type=int, default=None, help="fresh samples per evaluation (default 128)")
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    _procs.add_worker_args(p, WORKERS)
    args = p.parse_args(argv)
    _bench.setup(args)
    args.steps = args.steps or (3 if args.smoke else 30)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.eval_samples = args.eval_samples or (8 if args.smoke else 128)
    args.eval_every = args.eval_every or (2 if args.smoke else 5)
    if args.worker:
        return _procs.write_result(args, WORKERS[args.worker](args))

    try:
        import trl  # noqa: F401
    except ImportError as err:
        sys.exit(f"TRL is not installed ({err}): pip install trl")
    folder = float_weights_dir(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    t_start, load0 = time.perf_counter(), os.getloadavg()
    runs = {"ours": [], "trl": []}
    for rep in range(args.repeats):
        for name in _procs.order(["ours", "trl"], rep):
            seed = args.seed + rep
            res = _procs.run_worker(__file__, argv, name, ["--seed", seed, *(["--model-dir", folder] if folder else [])],
                                    env=env)
            runs[name].append(res)
            pts = "  ".join(f"{c[0]}:{c[2]['J']:+.3f}" for c in res["curve"])
            ev = res["curve"][-1][2]
            print(f"[{name:>4s} rep {rep}] train {res['train_s']:.1f}s CPU ({res['train_s'] / args.steps:.2f} s/step; "
                  f"process {res['process_s']:.0f} s wall, {res['process_cpu_s']:.0f} s CPU, load {res['load_avg'][0]}); "
                  f"J(step) on {args.eval_samples} fresh samples: {pts}; final ±{ev['J_se']:.3f} "
                  f"(E r {ev['reward']:+.3f}, KL {ev['kl']:.3f})", flush=True)

    rows = []
    for rep in range(args.repeats):
        o, t = runs["ours"][rep], runs["trl"][rep]
        y = yardsticks(o, t)
        rows.append({"rep": rep, **y,
                     "ours_s_per_step": o["train_s"] / args.steps, "trl_s_per_step": t["train_s"] / args.steps,
                     "speedup_per_step": t["train_s"] / o["train_s"],
                     "ours_curve": [(c[0], c[1], c[2]) for c in o["curve"]],
                     "trl_curve": [(c[0], c[1], c[2]) for c in t["curve"]]})
        print(f"rep {rep}: at equal training time ({y['equal_time']:.0f} s), mean J over its second half: ours "
              f"{y['ours_J_half']:+.3f} ± {y['ours_J_half_se']:.3f}, TRL {y['trl_J_half']:+.3f} ± "
              f"{y['trl_J_half_se']:.3f}; TRL's final level J* {y['target_J']:+.3f} reached after "
              f"{y['ours_time_to_target']:.0f} s (ours) vs {y['trl_time_to_target']:.0f} s (TRL) -> "
              f"{y['speedup_time_to_target']:.2f}x", flush=True)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    # A repeat where ours never reached TRL's level is slower than any that did: rank it lowest
    # (NaN would make the median meaningless), and say how many there were.
    reached = [r["speedup_time_to_target"] for r in rows if math.isfinite(r["speedup_time_to_target"])]
    ranked = sorted([-math.inf] * (len(rows) - len(reached)) + reached)
    to_target = statistics.median(ranked) if ranked else math.nan
    summary = {"speedup_per_step": med("speedup_per_step"),
               "speedup_time_to_target": to_target, "repeats_target_not_reached": len(rows) - len(reached),
               "ours_J_half": med("ours_J_half"), "trl_J_half": med("trl_J_half"),
               "ours_s_per_step": med("ours_s_per_step"), "trl_s_per_step": med("trl_s_per_step")}
    print(f"per-step time: ours {summary['ours_s_per_step']:.2f}s, TRL {summary['trl_s_per_step']:.2f}s -> "
          f"ours {summary['speedup_per_step']:.2f}x faster per step; time to the common target J: "
          + (f"ours {to_target:.2f}x faster (median over {args.repeats} repeat(s))" if math.isfinite(to_target) else
             f"not reached by ours in {len(rows) - len(reached)} of {len(rows)} repeat(s) (no median)"))

    os.makedirs(_bench.OUT_DIR, exist_ok=True)
    with open(os.path.join(_bench.OUT_DIR, "svi_vs_trl.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "repeat", "kind", "step", "train_time_s", "J", "J_se", "reward", "kl"])
        for name, rs in runs.items():
            for rep, r in enumerate(rs):
                for step, t_s, ev in r["curve"]:
                    w.writerow([name, rep, "eval", step, f"{t_s:.3f}", f"{ev['J']:.5f}", f"{ev['J_se']:.5f}",
                                f"{ev['reward']:.5f}", f"{ev['kl']:.5f}"])
                for i in range(len(r["J"])):
                    w.writerow([name, rep, "train-batch", i + 1, "", f"{r['J'][i]:.5f}", "",
                                f"{r['reward'][i]:.5f}", f"{r['kl'][i]:.5f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for name, color in (("ours", "C0"), ("trl", "C1")):
            for rep, r in enumerate(runs[name]):
                lab = ("ppl-lm SVI" if name == "ours" else "TRL RLOO") if rep == 0 else None
                c = r["curve"]
                J = [x[2]["J"] for x in c]
                se = [x[2]["J_se"] for x in c]
                ax[0].errorbar([x[1] for x in c], J, yerr=se, color=color, label=lab, alpha=0.8, capsize=2)
                ax[1].errorbar([x[0] for x in c], J, yerr=se, color=color, label=lab, alpha=0.8, capsize=2)
        ax[0].set_xlabel("training time (s)")
        ax[1].set_xlabel("step")
        for a in ax:
            a.set_ylabel(f"E_q[r] − β·KL ({args.eval_samples} fresh samples)")
            a.legend()
        fig.suptitle(f"SmolLM2-135M, VADER sentiment, β={args.beta}, {args.particles} particles, "
                     f"{args.tokens} tokens, LoRA r=8")
        fig.tight_layout()
        fig.savefig(os.path.join(_bench.OUT_DIR, "svi_vs_trl.png"), dpi=110)
    except Exception as err:  # the plot is a convenience; the CSV holds the data
        print(f"(no plot: {err})")
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at start {load0[0]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}")
    _bench.emit("svi_vs_trl", {"args": vars(args), "rows": rows, **summary})


if __name__ == "__main__":
    main()
