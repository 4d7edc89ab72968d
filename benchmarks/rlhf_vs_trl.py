"""RLHF on preference pairs: ppl-lm against TRL, each side in its own process (issue 20, item 8).

The same data on every side: the shipped ``models/data/sentiment_prefs.jsonl`` (200 pairs of
SmolLM2 continuations of "I watched the new movie last night and", 16 new tokens, chosen by a
simulated Bradley–Terry rater with u = 2·VADER − length/16); the first ``--train`` pairs train,
the rest are held out. β (``--beta``, 0.5), LoRA r=8, α=16 on q_proj/v_proj, one torch thread,
Adam at the same peak step size and gradient-norm clip on both sides of a policy stage.

Three stages; in each, ours and TRL run in separate processes (issue 24: a peer sharing our
process ran 1.3–1.5× slower), one after the other, the order alternating from stage to stage and
repeat to repeat, the same seed on both sides. Time is the training thread's CPU time
(``time.thread_time``), evaluations off the clock, model loading not counted.

1. **Reward model**, time to a held-out preference accuracy. Ours: ``ppl_lm.fit_reward(method=
   "laplace")``, a Bayesian Bradley–Terry head on frozen SmolLM2 features (the last hidden state,
   mean-pooled over the continuation up to EOS, standardised): one forward pass over the
   training texts, then the fit. TRL: ``RewardTrainer`` (LoRA + a linear score head on the
   sequence-classification model, its default step size), evaluated every ``--rm-eval-every``
   steps on the held-out pairs. The target is TRL's final held-out accuracy (the mean of its
   last two evaluations). For reference, ours also fits the rater's own two features
   [VADER, length/16] (it knows the utility's form, so it is not a like-for-like comparison).
2. **Policy on the learned reward**: ``method="svi"`` (reverse KL) against ``RLOOTrainer``, both
   maximising J = E_q[r̄] − β·KL(q‖π) with r̄ the posterior-mean reward of the two-feature head
   fitted to the training pairs (the same θ on both sides). The harness and yardsticks are
   ``svi_vs_trl.py``'s: J on fresh samples with common random numbers every ``--eval-every``
   steps; the mean J over the second half of the shorter run's training time; the time each
   side's running mean (3 evaluations) needs to reach TRL's final level.
3. **DPO**: ``method="svi", objective="dpo"`` against ``DPOTrainer`` (sigmoid loss), the same
   pairs, β, batch size and steps. Yardstick: the DPO loss on ``--dpo-eval-pairs`` fixed
   training pairs, scored by one function for both sides (log q − log π of our token ids),
   as J = −loss, with the same two yardsticks.

    python benchmarks/rlhf_vs_trl.py --threads 1            # one repeat, about 15-20 minutes
    python benchmarks/rlhf_vs_trl.py --threads 1 --smoke    # tiny sizes, checks the plumbing
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402
import _procs  # noqa: E402
import svi_vs_trl as base  # noqa: E402

STAGES = ("rm", "rloo", "dpo")


# -- data ---------------------------------------------------------------------------------------
def pairs(lm, args):
    """The shipped pairs as token ids ``[n, T]`` (train, held-out) and as texts (train, held-out)."""
    import ppl_lm
    from ppl_lm.models import preferences as mp

    prefs = ppl_lm.Preferences.from_jsonl(mp.DATA)
    if prefs.context is not None and set(prefs.context) != {base.PROMPT}:
        raise ValueError(f"{mp.DATA} answers other contexts than {base.PROMPT!r}")
    c, r = prefs.tokens(lm, args.tokens)
    n = args.train
    texts = (prefs.chosen[:n], prefs.rejected[:n]), (prefs.chosen[n:], prefs.rejected[n:])
    return (c[:n], r[:n]), (c[n:], r[n:]), texts


def two_feature_reward(lm, args):
    """r̄(x) = θ̄·[VADER(x), length(x)/T], θ's posterior mean fitted (Laplace) to the training pairs."""
    import ppl_lm
    from ppl_lm.models import preferences as mp

    (c, r), _, _ = pairs(lm, args)
    phi = mp.features(lm, args.tokens)
    rm = ppl_lm.fit_reward(ppl_lm.Preferences(c, r), phi, method="laplace", num_samples=200, seed=0)
    return rm, (lambda lm_, x: rm.reward(x).float())


def pooled_hidden(lm, x, batch=32):
    """The last hidden state of SmolLM2 given the prompt, mean-pooled over each continuation's
    tokens up to and including its first EOS: ``[N, 576]`` (float64)."""
    from ppl_lm.tokens import after_eos_mask

    prompt = torch.tensor(lm.encode(base.PROMPT))
    out = []
    with torch.no_grad():
        for k in range(0, len(x), batch):
            xb = x[k: k + batch]
            ids = torch.cat([prompt.expand(len(xb), -1), xb], 1)
            h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, len(prompt):]
            keep = (~after_eos_mask(xb, lm.eos_id)).double()
            out.append((h.double() * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))
    return torch.cat(out)


# -- stage 1: reward models -----------------------------------------------------------------------
def rm_ours(lm, args, seed):
    import ppl_lm

    (c, r), (hc, hr), _ = pairs(lm, args)
    t0 = time.thread_time()
    feats = pooled_hidden(lm, torch.cat([c, r]))
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    table = {tuple(row.tolist()): (f - mu) / sd for row, f in zip(torch.cat([c, r]), feats)}

    def phi(x):  # the training texts from the table; others (held-out) by one more forward pass
        rows = [table.get(tuple(row.tolist())) for row in x]
        if any(v is None for v in rows):
            return (pooled_hidden(lm, x) - mu) / sd
        return torch.stack(rows)

    rm = ppl_lm.fit_reward(ppl_lm.Preferences(c, r), phi, method="laplace", prior_scale=args.rm_prior_scale,
                           num_samples=200, num_steps=args.rm_fit_steps, seed=seed)
    train_s = time.thread_time() - t0
    held = ppl_lm.Preferences(hc, hr)
    acc = rm.accuracy(held)
    t0 = time.thread_time()
    rm2, _ = two_feature_reward(lm, args)
    two_s = time.thread_time() - t0
    acc2 = rm2.accuracy(held, lm, args.tokens)
    return {"train_s": train_s, "heldout_accuracy": acc, "train_accuracy": rm.diagnostics["train_accuracy"],
            "curve": _one_shot(train_s, acc, len(held)),
            "two_feature": {"theta": rm2.mean.tolist(), "heldout_accuracy": acc2, "train_s": two_s,
                            "curve": _one_shot(two_s, acc2, len(held))}}


def _one_shot(seconds, acc, n):
    """The accuracy curve of a fit that has no result before it ends: chance until ``seconds``."""
    chance = {"J": 0.5, "J_se": 0.0}
    return [(0, 0.0, chance), (0, seconds, chance), (1, seconds, {"J": acc, "J_se": _acc_se(acc, n)})]


def _acc_se(p, n):
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def seq_cls_copy(model):
    """The same weights under a sequence-classification head (num_labels=1; the head is new)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.num_labels = 1
    cfg.pad_token_id = cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    net = AutoModelForSequenceClassification.from_config(cfg, dtype=next(model.parameters()).dtype)
    sd = {k.removeprefix("model."): v for k, v in model.state_dict().items() if k.startswith("model.")}
    missing, unexpected = net.model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not transfer: missing {missing}, unexpected {unexpected}")
    return net


def trl_trainer(trainer_cls, net, cfg, ds, tok, task, callback):
    """A TRL trainer with our LoRA (r=8, α=16 on q_proj/v_proj) and the evaluation callback, quiet."""
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback

    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                          task_type=task)
    trainer = trainer_cls(model=net, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                          callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; they stay in state.log_history
    return trainer


def rm_trl(lm, args, seed):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    (_, _), _, ((tc, tr), (hc, hr)) = pairs(lm, args)
    tok = lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    net = seq_cls_copy(lm.model)
    clock = {"t0": None, "paused": 0.0}
    curve = [(0, 0.0, {"J": 0.5, "J_se": 0.0})]

    def heldout_accuracy(model):
        def scores(texts):
            enc = tok([base.PROMPT + t + tok.eos_token for t in texts], return_tensors="pt", padding=True)
            with torch.no_grad():
                return model(**enc).logits[:, 0].double()

        was = model.training
        model.eval()
        d = scores(hc) - scores(hr)
        model.train(was)
        return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())

    class EvalClock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["t0"] = time.thread_time()

        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step % args.rm_eval_every and state.global_step != state.max_steps:
                return
            t = time.thread_time() - clock["t0"] - clock["paused"]
            p0 = time.thread_time()
            acc = heldout_accuracy(trainer.model)
            curve.append((state.global_step, t, {"J": acc, "J_se": _acc_se(acc, len(hc))}))
            clock["paused"] += time.thread_time() - p0

    cfg = RewardConfig(output_dir=tempfile.mkdtemp(prefix="trl_rm_"), per_device_train_batch_size=args.rm_batch,
                       max_steps=args.rm_steps, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
                       save_strategy="no", report_to="none", gradient_checkpointing=False, bf16=False, fp16=False,
                       use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0, max_length=64)
    ds = Dataset.from_dict({"chosen": [base.PROMPT + t for t in tc], "rejected": [base.PROMPT + t for t in tr]})
    trainer = trl_trainer(RewardTrainer, net, cfg, ds, tok, "SEQ_CLS", EvalClock())
    trainer.train()
    return {"train_s": curve[-1][1], "heldout_accuracy": curve[-1][2]["J"], "curve": curve,
            "learning_rate": cfg.learning_rate}


# -- stage 2: the policy on the learned reward (svi_vs_trl's harness) ------------------------------
def rloo_ours(lm, args, seed):
    _, reward = two_feature_reward(lm, args)
    return _policy_result(base.run_ours(lm, args, seed, reward))


def rloo_trl(lm, args, seed):
    _, reward = two_feature_reward(lm, args)
    tok = lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return _policy_result(base.run_trl(base.plain_copy(lm.model), tok, args, seed, reward))


def _policy_result(res):
    return {"train_s": res["train_s"], "curve": res["curve"]}


# -- stage 3: DPO ---------------------------------------------------------------------------------------
def dpo_eval(q_lm, ref_lm, c, r, beta):
    """J = −(DPO loss) on the pairs (c, r), scored as log q − log π of the token ids, with its se."""
    import torch.nn.functional as F

    with torch.no_grad():
        m = beta * ((q_lm.score(base.PROMPT, c) - ref_lm.score(base.PROMPT, c))
                    - (q_lm.score(base.PROMPT, r) - ref_lm.score(base.PROMPT, r))).double()
    per = F.logsigmoid(m)
    return {"J": float(per.mean()), "J_se": float(per.std() / math.sqrt(len(per))),
            "accuracy": float((m > 0).double().mean())}


def dpo_ours(lm, args, seed):
    import pyro

    import ppl_lm

    (c, r), _, _ = pairs(lm, args)
    ec, er = c[: args.dpo_eval_pairs], r[: args.dpo_eval_pairs]
    T = args.tokens

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        return x

    pyro.clear_param_store()
    curve = [(0, 0.0, dpo_eval(lm, lm, ec, er, args.beta))]

    def on_step(step, guide, stats):
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, stats["cpu_seconds"], dpo_eval(guide.lm, lm, ec, er, args.beta)))

    post = ppl_lm.infer(model, base.PROMPT, method="svi", objective="dpo", preferences=ppl_lm.Preferences(c, r),
                        beta=args.beta, batch_size=args.dpo_batch, guide="lora", num_steps=args.steps, lr=args.lr,
                        lr_decay=args.lr_decay, clip_norm=args.clip_norm, lora_r=8, lora_alpha=16, num_samples=2,
                        crosscheck_samples=0, seed=seed, progress=False, callback=on_step)
    return {"train_s": float(post.info.trace["cpu_seconds"][-1]), "curve": curve}


def dpo_trl(lm, args, seed):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ppl_lm import TransformersLM

    (c, r), _, ((tc, tr), _) = pairs(lm, args)
    ec, er = c[: args.dpo_eval_pairs], r[: args.dpo_eval_pairs]
    tok = lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    net = base.plain_copy(lm.model)
    for p in net.parameters():
        p.requires_grad_(False)
    base_lm = TransformersLM(net, tok)
    curve = [(0, 0.0, dpo_eval(base_lm, base_lm, ec, er, args.beta))]
    clock = {"t0": None, "paused": 0.0}

    class EvalClock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["t0"] = time.thread_time()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % args.eval_every and state.global_step != args.steps:
                return
            t = time.thread_time() - clock["t0"] - clock["paused"]
            p0 = time.thread_time()
            peft_model = trainer.model
            was = peft_model.training
            peft_model.eval()
            q_lm = TransformersLM(peft_model.get_base_model(), tok)
            curve.append((state.global_step, t, dpo_eval(q_lm, base.RefLM(peft_model, tok), ec, er, args.beta)))
            peft_model.train(was)
            clock["paused"] += time.thread_time() - p0

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_dpo_"), beta=args.beta, loss_type=["sigmoid"],
                    per_device_train_batch_size=args.dpo_batch, max_steps=args.steps, learning_rate=args.lr,
                    lr_scheduler_type=args.trl_scheduler, warmup_steps=0, weight_decay=0.0,
                    max_grad_norm=args.clip_norm, logging_steps=1, save_strategy="no", report_to="none",
                    gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=seed,
                    disable_tqdm=True, dataloader_num_workers=0, max_length=64)
    ds = Dataset.from_dict({"prompt": [base.PROMPT] * len(tc), "chosen": list(tc), "rejected": list(tr)})
    trainer = trl_trainer(DPOTrainer, net, cfg, ds, tok, "CAUSAL_LM", EvalClock())
    trainer.train()
    return {"train_s": curve[-1][1], "curve": curve}


WORKERS = {"rm-ours": rm_ours, "rm-trl": rm_trl, "rloo-ours": rloo_ours, "rloo-trl": rloo_trl,
           "dpo-ours": dpo_ours, "dpo-trl": dpo_trl}


def worker(args) -> dict:
    """One side of one stage, in this process: load SmolLM2, run, return the result."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF conversion's progress bars
        lm = _bench.smollm2(args)
    if lm.tokenizer is None:
        sys.exit("TRL needs a tokenizer: run without --config-only")
    wall = time.perf_counter()
    res = WORKERS[args.worker](lm, args, args.seed)
    res["wall_s"] = time.perf_counter() - wall
    return res


def rm_yardstick(o, t):
    """Time to TRL's final held-out accuracy (mean of its last two evaluations)."""
    target = float(np.mean([c[2]["J"] for c in t["curve"][-2:]]))
    to, tt = base.time_to(o["curve"], target), base.time_to(t["curve"], target)
    t2 = base.time_to(o["two_feature"]["curve"], target)
    return {"target_accuracy": target, "ours_time_to_target": to, "trl_time_to_target": tt,
            "speedup_time_to_target": tt / to if to > 0 else math.nan,
            "two_feature_time_to_target": t2, "two_feature_speedup": tt / t2 if t2 > 0 else math.nan}


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    _procs.add_worker_args(p, WORKERS)
    p.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    p.add_argument("--train", type=int, default=140, help="training pairs (the rest of the 200 are held out)")
    p.add_argument("--tokens", type=int, default=16, help="new tokens (the pairs' length)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=None, help="policy and DPO steps (default 16)")
    p.add_argument("--particles", type=int, default=8, help="completions per step (policy)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam step size, both sides (policy and DPO)")
    p.add_argument("--lr-decay", type=float, default=0.1)
    p.add_argument("--trl-scheduler", default="linear")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 4)")
    p.add_argument("--eval-samples", type=int, default=None, help="fresh samples per J evaluation (default 64)")
    p.add_argument("--dpo-batch", type=int, default=8, help="pairs per DPO step, both sides")
    p.add_argument("--dpo-eval-pairs", type=int, default=None, help="training pairs in the DPO yardstick (default 48)")
    p.add_argument("--rm-steps", type=int, default=None, help="RewardTrainer steps (default 36: about 2 epochs)")
    p.add_argument("--rm-batch", type=int, default=8)
    p.add_argument("--rm-eval-every", type=int, default=None, help="RewardTrainer steps between evaluations (default 6)")
    p.add_argument("--rm-prior-scale", type=float, default=0.01, help="ours: prior sd of the head on standardised features")
    p.add_argument("--rm-fit-steps", type=int, default=300, help="ours: Adam steps before the L-BFGS polish")
    args = p.parse_args(argv)
    _bench.setup(args)
    args.steps = args.steps or (2 if args.smoke else 16)
    args.repeats = args.repeats or 1
    args.eval_samples = args.eval_samples or (8 if args.smoke else 64)
    args.eval_every = args.eval_every or (1 if args.smoke else 4)
    args.dpo_eval_pairs = args.dpo_eval_pairs or (8 if args.smoke else 48)
    args.rm_steps = args.rm_steps or (2 if args.smoke else 36)
    args.rm_eval_every = args.rm_eval_every or (1 if args.smoke else 6)
    if args.worker:
        return _procs.write_result(args, worker(args))
    try:
        import trl  # noqa: F401
    except ImportError as err:
        sys.exit(f"TRL is not installed ({err}): pip install -e '.[bench]'")
    argv = list(sys.argv[1:] if argv is None else argv)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    rows = {s: [] for s in args.stages}
    for rep in range(args.repeats):
        for k, stage in enumerate(args.stages):
            order = _procs.order(["ours", "trl"], rep + k)
            res = {side: _procs.run_worker(__file__, argv, f"{stage}-{side}", ["--seed", args.seed + rep], env=env)
                   for side in order}
            for side in order:
                r = res[side]
                pts = "  ".join(f"{c[0]}:{c[1]:.0f}s:{c[2]['J']:+.3f}" for c in r["curve"])
                print(f"[{stage} {side:>4s} rep {rep}] train {r['train_s']:.1f} CPU s, process {r['process_s']:.0f} s; "
                      f"(step:time:{'accuracy' if stage == 'rm' else 'J'}) {pts}", flush=True)
            o, t = res["ours"], res["trl"]
            y = rm_yardstick(o, t) if stage == "rm" else base.yardsticks(o, t)
            rows[stage].append({"rep": rep, "order": order, **y, "ours": o, "trl": t})
            if stage == "rm":
                print(f"rm rep {rep}: held-out accuracy ours {o['heldout_accuracy']:.3f} in {o['train_s']:.1f} s "
                      f"(two-feature head: {o['two_feature']['heldout_accuracy']:.3f}), TRL {t['heldout_accuracy']:.3f} "
                      f"after {t['train_s']:.1f} s; target {y['target_accuracy']:.3f} reached after "
                      f"{y['ours_time_to_target']:.1f} s (ours) vs {y['trl_time_to_target']:.1f} s (TRL) -> "
                      f"{y['speedup_time_to_target']:.2f}x; two-feature head {y['two_feature_time_to_target']:.1f} s -> "
                      f"{y['two_feature_speedup']:.2f}x", flush=True)
            else:
                print(f"{stage} rep {rep}: equal time {y['equal_time']:.0f} s, mean J over its second half: ours "
                      f"{y['ours_J_half']:+.3f} ± {y['ours_J_half_se']:.3f}, TRL {y['trl_J_half']:+.3f} ± "
                      f"{y['trl_J_half_se']:.3f}; TRL's final level {y['target_J']:+.3f} reached after "
                      f"{y['ours_time_to_target']:.0f} s (ours) vs {y['trl_time_to_target']:.0f} s (TRL) -> "
                      f"{y['speedup_time_to_target']:.2f}x; per step {t['train_s'] / o['train_s']:.2f}x", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at start {load0[0]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}")
    _bench.emit("rlhf_vs_trl", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
