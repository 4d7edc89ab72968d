"""KL-regularised fine-tuning toward positive sentiment: ppl-lm SVI vs TRL's RLOO trainer.

The same problem on both sides: SmolLM2-135M, prompt "I watched the new movie last night
and", 12 new tokens, reward r = VADER compound sentiment of the continuation, β = 0.25,
objective J(q) = E_q[r] − β·KL(q‖π) (π: the frozen LM), LoRA r=8, α=16 on q_proj/v_proj, 8
particles (completions) per step, Adam at the same step size, constant, 30 steps.

- ours: ``ppl_lm.infer(model, prompt, method="svi", guide="lora", num_particles=8, ...)``; the
  model is ``ppl_lm.reward("sentiment", r, beta=β)`` so the ELBO is J/β. Per-step J estimates:
  ``trace["reward:sentiment"] − β·trace["kl_prior"]``.
- TRL: ``RLOOTrainer`` with ``RLOOConfig(beta=β, num_generations=8, per_device_train_batch_size=8,
  max_completion_length=12, num_iterations=1, top_k=0, top_p=1, temperature=1,
  lr_scheduler_type="constant", max_grad_norm=0.0, gradient_checkpointing=False, bf16=False,
  use_cpu=True)``. Its reward is r − β·Σ_t log(q/π) (sequence KL), its advantage the same RLOO
  leave-one-out baseline, so its gradient is β × ours (Adam is scale-free). Per-step J
  estimates: ``reward − β·kl·mean_length`` from its logs (``kl`` is the per-token mean).

Both per-step estimates are on-policy 8-sample estimates of J; the curves are smoothed (running
mean over 5 steps) and "time to target" is the training time at which each smoothed curve
first reaches the target = the lower of the two final smoothed values. Training time excludes
model loading and the trainer's construction (reported separately). At the end, each trained
policy is evaluated on ``--eval-samples`` fresh samples (J with its standard error).

Runs alternate ours / TRL / TRL / ours ... over ``--repeats`` (seeds differ per repeat).
Curves go to benchmarks/out/svi_vs_trl.csv and .png.

    python benchmarks/svi_vs_trl.py            # 30 steps, 2 repeats (about 10 minutes on 2 cores)
    python benchmarks/svi_vs_trl.py --smoke    # tiny: 3 steps on SmolLM2, 1 repeat
"""

from __future__ import annotations

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

PROMPT = "I watched the new movie last night and"


def vader(texts):
    from ppl_lm.rewards import _vader

    return [float(_vader().polarity_scores(t)["compound"]) for t in texts]


def running_mean(x, w=5):
    x = np.asarray(x, dtype=float)
    return np.array([x[max(0, i - w + 1): i + 1].mean() for i in range(len(x))])


def evaluate(q_lm, p_lm, beta, T, M, seed):
    """J = mean(r − β(log q − log π)) over M fresh samples from q, with its standard error."""
    from ppl_lm import rewards

    g = torch.Generator().manual_seed(seed)
    prompt = q_lm.encode(PROMPT)
    with torch.no_grad():
        x, lq = q_lm.sample(prompt, M, T, generator=g)
        lp = p_lm.score(prompt, x)
    r = rewards.sentiment(p_lm, x).double()
    kl = lq.sum(-1).double() - lp.double()
    j = r - beta * kl
    return {"J": float(j.mean()), "J_se": float(j.std() / math.sqrt(M)), "reward": float(r.mean()),
            "kl": float(kl.mean())}


def run_ours(lm, args, seed):
    import ppl_lm
    from ppl_lm import rewards

    beta, T = args.beta, args.tokens

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.reward("sentiment", rewards.sentiment(lm, x), beta=beta)
        return x

    pyro.clear_param_store()
    t0 = time.perf_counter()
    post = ppl_lm.infer(model, PROMPT, method="svi", guide="lora", num_steps=args.steps,
                        num_particles=args.particles, lr=args.lr, lora_r=8, lora_alpha=16,
                        num_samples=2, seed=seed, progress=False)
    total = time.perf_counter() - t0
    tr = post.info["trace"]
    J = np.asarray(tr["reward:sentiment"]) - beta * np.asarray(tr["kl_prior"])
    sps = post.info["seconds_per_step"]
    times = sps * np.arange(1, len(J) + 1)  # uniform steps: the trace has no per-step clock
    ev = evaluate(post.guide.lm, lm, beta, T, args.eval_samples, seed + 7)
    return {"J": J, "reward": np.asarray(tr["reward:sentiment"]), "kl": np.asarray(tr["kl_prior"]),
            "time": times, "train_s": post.info["train_time"], "setup_s": total - post.info["train_time"],
            "eval": ev}


def run_trl(base_model, tokenizer, args, seed):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from ppl_lm import TransformersLM

    model = copy.deepcopy(base_model)
    for p in model.parameters():
        p.requires_grad_(False)
    clock = {"t": [], "t0": None}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            clock["t"].append(time.perf_counter() - clock["t0"])

    def sentiment_reward(completions, **kw):
        return vader(completions)

    t0 = time.perf_counter()
    out = tempfile.mkdtemp(prefix="trl_")
    cfg = RLOOConfig(
        output_dir=out, beta=args.beta, num_generations=args.particles,
        per_device_train_batch_size=args.particles, max_completion_length=args.tokens,
        num_iterations=1, temperature=1.0, top_k=0, top_p=1.0, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=seed,
        disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=False,
    )
    ds = Dataset.from_dict({"prompt": [PROMPT] * args.steps})
    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          bias="none", task_type="CAUSAL_LM")
    trainer = RLOOTrainer(model=model, reward_funcs=sentiment_reward, args=cfg, train_dataset=ds,
                          processing_class=tokenizer, peft_config=peft_cfg, callbacks=[Clock()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; they stay in state.log_history
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    logs = [h for h in trainer.state.log_history if "reward" in h and "kl" in h]
    reward = np.array([h["reward"] for h in logs])
    kl_seq = np.array([h["kl"] * h["completions/mean_length"] for h in logs])
    J = reward - args.beta * kl_seq
    peft_model = trainer.model
    base = peft_model.get_base_model()
    q_lm = TransformersLM(base, tokenizer)
    peft_model.eval()

    class RefLM(TransformersLM):
        """π: the same network with the adapter disabled."""

        def score(self, prompt, tokens):
            with peft_model.disable_adapter():
                return super().score(prompt, tokens)

    ev = evaluate(q_lm, RefLM(base, tokenizer), args.beta, args.tokens, args.eval_samples, seed + 7)
    return {"J": J, "reward": reward, "kl": kl_seq, "time": np.array(clock["t"][: len(J)]),
            "train_s": train_s, "setup_s": setup, "eval": ev}


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


def time_to(curve_t, curve_j, target):
    """First time at which the smoothed curve reaches ``target`` (linear interpolation), or nan."""
    j = running_mean(curve_j)
    for i in range(len(j)):
        if j[i] >= target:
            if i == 0:
                return float(curve_t[0])
            f = (target - j[i - 1]) / (j[i] - j[i - 1]) if j[i] != j[i - 1] else 1.0
            return float(curve_t[i - 1] + f * (curve_t[i] - curve_t[i - 1]))
    return float("nan")


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default 30)")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--beta", type=float, default=0.25)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=None, help="fresh samples for the final J (default 128)")
    args = p.parse_args(argv)
    _bench.setup(args)
    args.steps = args.steps or (3 if args.smoke else 30)
    args.repeats = args.repeats or (1 if args.smoke else 2)
    args.eval_samples = args.eval_samples or (8 if args.smoke else 128)

    try:
        import trl  # noqa: F401
    except ImportError as err:
        sys.exit(f"TRL is not installed ({err}): pip install trl")
    lm = _bench.smollm2(args)
    if lm.tokenizer is None:
        sys.exit("TRL needs a tokenizer: run without --config-only")
    pristine = plain_copy(lm.model)  # TRL gets a fresh copy without our adapters each time
    tokenizer = lm.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    runs = {"ours": [], "trl": []}
    for rep in range(args.repeats):
        order = ["ours", "trl"] if rep % 2 == 0 else ["trl", "ours"]
        for name in order:
            seed = args.seed + rep
            res = run_ours(lm, args, seed) if name == "ours" else run_trl(pristine, tokenizer, args, seed)
            runs[name].append(res)
            ev = res["eval"]
            print(f"[{name:>4s} rep {rep}] train {res['train_s']:.1f}s ({res['train_s'] / args.steps:.2f} s/step), "
                  f"setup {res['setup_s']:.1f}s; per-step J first/last(smoothed) "
                  f"{running_mean(res['J'])[0]:+.3f} -> {running_mean(res['J'])[-1]:+.3f}; final J on "
                  f"{args.eval_samples} fresh samples {ev['J']:+.3f} ± {ev['J_se']:.3f} "
                  f"(E r {ev['reward']:+.3f}, KL {ev['kl']:.3f})", flush=True)

    # time to target, per repeat pair
    rows = []
    for rep in range(args.repeats):
        o, t = runs["ours"][rep], runs["trl"][rep]
        target = min(running_mean(o["J"])[-1], running_mean(t["J"])[-1])
        to, tt = time_to(o["time"], o["J"], target), time_to(t["time"], t["J"], target)
        rows.append({"rep": rep, "target_J": target, "ours_time_to_target": to, "trl_time_to_target": tt,
                     "speedup_time_to_target": tt / to if to > 0 else float("nan"),
                     "ours_s_per_step": o["train_s"] / args.steps, "trl_s_per_step": t["train_s"] / args.steps,
                     "speedup_per_step": t["train_s"] / o["train_s"],
                     "ours_final_J": o["eval"], "trl_final_J": t["eval"],
                     "ours_setup_s": o["setup_s"], "trl_setup_s": t["setup_s"]})
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    summary = {"speedup_per_step": med("speedup_per_step"),
               "speedup_time_to_target": med("speedup_time_to_target"),
               "ours_s_per_step": med("ours_s_per_step"), "trl_s_per_step": med("trl_s_per_step")}
    print(f"per-step time: ours {summary['ours_s_per_step']:.2f}s, TRL {summary['trl_s_per_step']:.2f}s -> "
          f"ours {summary['speedup_per_step']:.2f}x faster per step; time to the common target J: "
          f"ours {summary['speedup_time_to_target']:.2f}x faster (median over {args.repeats} repeat(s))")

    os.makedirs(_bench.OUT_DIR, exist_ok=True)
    csv_path = os.path.join(_bench.OUT_DIR, "svi_vs_trl.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "repeat", "step", "train_time_s", "J", "J_smoothed", "reward", "kl"])
        for name, rs in runs.items():
            for rep, r in enumerate(rs):
                js = running_mean(r["J"])
                for i in range(len(r["J"])):
                    w.writerow([name, rep, i + 1, f"{r['time'][i]:.3f}", f"{r['J'][i]:.5f}", f"{js[i]:.5f}",
                                f"{r['reward'][i]:.5f}", f"{r['kl'][i]:.5f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for name, color in (("ours", "C0"), ("trl", "C1")):
            for rep, r in enumerate(runs[name]):
                lab = ("ppl-lm SVI" if name == "ours" else "TRL RLOO") if rep == 0 else None
                ax[0].plot(r["time"], running_mean(r["J"]), color=color, label=lab, alpha=0.8)
                ax[1].plot(np.arange(1, len(r["J"]) + 1), running_mean(r["J"]), color=color, label=lab, alpha=0.8)
        ax[0].set_xlabel("training time (s)")
        ax[1].set_xlabel("step")
        for a in ax:
            a.set_ylabel("E_q[r] − β·KL (running mean of 5 steps)")
            a.legend()
        fig.suptitle(f"SmolLM2-135M, VADER sentiment, β={args.beta}, {args.particles} particles, "
                     f"{args.tokens} tokens, LoRA r=8")
        fig.tight_layout()
        fig.savefig(os.path.join(_bench.OUT_DIR, "svi_vs_trl.png"), dpi=110)
    except Exception as err:  # the plot is a convenience; the CSV holds the data
        print(f"(no plot: {err})")
    _bench.emit("svi_vs_trl", {"args": vars(args), "rows": rows, **summary})


if __name__ == "__main__":
    main()
