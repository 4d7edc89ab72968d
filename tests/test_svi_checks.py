"""SVI runs built to fail, and checkpoints of another run: each must say so, first and clearly.

Detectors (typed warnings on ``post.warnings``): a huge learning rate (divergence / collapse),
a guide with all its mass on one sequence (the guide-vs-prior cross-check), NaN gradients;
an impossible hard constraint (an error that keeps the guide and gives the right advice);
checkpoint fingerprints (another β, context, max_new_tokens, LM or objective is refused);
Ctrl-C checkpoints the step under way, and resuming from it gives the uninterrupted run.
"""

from __future__ import annotations

import math
import os
import signal

import pyro
import pytest
import torch
from ppl_lm.inference import svi
from ppl_lm.inference.svi.checkpoint import CheckpointMismatch
from ppl_lm.inference.svi.guides import make_guide
from ppl_lm.inference.svi.training import TrainingInterrupted
from toys import LMS, T, soft_reward

import ppl_lm


def codes(post):
    return {w.code for w in post.warnings}


def test_a_sound_run_has_no_warnings():
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    for objective in ("reverse", "forward"):
        post = ppl_lm.infer(model, *args, method="svi", objective=objective, num_steps=150, num_particles=64,
                            num_samples=500, progress=False, seed=1)
        # no SVI detector fires (the weights' own k-hat may: a reverse-KL guide is lighter-tailed
        # than the posterior, which is what k-hat measures)
        assert not [w for w in post.warnings if w.code.startswith("svi_")], [str(w) for w in post.warnings]
        cross = post.info.crosscheck
        exact = ppl_lm.infer(model, *args, method="exact")
        # the cross-check's KL(q‖π′) is near zero once trained, and KL(π‖π′) is the exact one
        assert cross.kl_reverse < cross.kl_at_prior
        assert abs(cross.log_evidence - exact.log_evidence) < 4 * cross.log_evidence_se


def test_huge_learning_rate_warns():
    """lr = 50 on the Markov table: the guide leaves the posterior and the run says so."""
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    post = ppl_lm.infer(model, *args, method="svi", guide="full", num_steps=60, num_particles=16, lr=50.0,
                        lr_decay=1.0, clip_norm=None, num_samples=300, progress=False, seed=0)
    found = codes(post)
    assert found & {"svi_divergence", "svi_collapse", "svi_worse_than_prior", "svi_misses_mass"}, found
    first = post.warnings[0]
    assert first.fix and "lr" in first.fix


def test_all_mass_on_one_sequence_is_caught_by_the_crosscheck():
    """A guide that puts (nearly) all its mass on one text, not trained further: its own weights
    look perfect (ESS ~ N), but prior importance sampling shows the mass it misses."""
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    g = make_guide(model, *args)
    with torch.no_grad():
        g.module.init_logits.fill_(-30.0)
        g.module.init_logits[2] = 30.0  # always 'b'
        g.module.trans_logits.fill_(-30.0)
        g.module.trans_logits[:, :, 0] = 30.0  # then EOS
    post = ppl_lm.infer(model, *args, method="svi", guide=g, num_steps=0, num_samples=300, progress=False, seed=0)
    assert post.ess > 0.9 * len(post)  # the guide's own weights cannot see the problem
    assert {"svi_misses_mass", "svi_worse_than_prior"} <= codes(post), codes(post)


def test_collapse_beyond_what_the_posterior_can_have():
    from ppl_lm.inference.svi import checks

    # rewards in [0, 1] at β = 0.5: no posterior has KL(π′‖π) above 2 nats
    assert checks.kl_beyond_posterior([30.0] * 20, reward_range=2.0)[0].code == "svi_collapse"
    assert checks.kl_beyond_posterior([1.5] * 20, reward_range=2.0) == []


def test_divergence_detector_judges_against_the_trace_noise():
    from ppl_lm.inference.svi import checks

    g = torch.Generator().manual_seed(0)
    noisy_flat = (torch.randn(200, generator=g) * 0.5).numpy()
    assert checks.divergence(noisy_flat) == []  # noise alone never warns
    rising = noisy_flat + torch.linspace(0, 3, 200).numpy()
    assert checks.divergence(rising) == []
    falling = noisy_flat.copy()
    falling[150:] -= 3.0
    assert checks.divergence(falling)[0].code == "svi_divergence"


def test_nan_gradients_are_skipped_and_reported(monkeypatch):
    """A planted NaN in every third step's coefficients: those steps are skipped (the guide stays
    finite, the other steps train) and the run warns, naming how many."""
    from ppl_lm.inference.svi.elbo import RLOO_ELBO

    real, calls = RLOO_ELBO.coefficients, [0]

    def sometimes_nan(self, a):
        calls[0] += 1
        c = real(self, a)
        return c * math.nan if calls[0] % 3 == 0 else c

    monkeypatch.setattr(RLOO_ELBO, "coefficients", sometimes_nan)
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    post = ppl_lm.infer(model, *args, method="svi", num_steps=30, num_particles=16, num_samples=50,
                        crosscheck_samples=0, progress=False, seed=0)
    nan = [w for w in post.warnings if w.code == "svi_nan"]
    assert nan and "10 of 30 steps" in nan[0].message
    assert post.info.skipped_steps == 10
    assert all(torch.isfinite(p).all() for p in post.guide.module.parameters())


def test_impossible_hard_constraint_keeps_the_guide_and_says_why():
    lm = LMS["markov"]()

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        ppl_lm.constraint("impossible", x[..., 0] == 99)
        return x

    with pytest.raises(svi.SVIError) as info:
        ppl_lm.infer(model, method="svi", num_steps=5, num_particles=8, num_samples=50, progress=False, seed=0)
    msg = str(info.value)
    assert "impossible" in msg and "no draw" in msg and "method='svi'" not in msg
    assert info.value.guide is not None and info.value.info.num_steps == 5


def test_impossible_hard_constraint_stops_training_early():
    """No draw satisfies the condition: the run stops after a tenth of its steps (at least 20),
    not after all of them, with the same advice and the guide kept."""
    lm = LMS["markov"]()

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.constraint("impossible", x[..., 0] == 99)

    seen = []
    with pytest.raises(svi.SVIError) as info:
        ppl_lm.infer(model, method="svi", num_steps=400, num_particles=8, num_samples=50, progress=False, seed=0,
                     callback=lambda step, guide, stats: seen.append(step))
    assert "stopped after 40 training step(s) (320 draws" in str(info.value)
    assert len(seen) == 39  # the user's callback ran for the steps before the stop
    assert info.value.guide is not None


def test_a_rare_condition_found_in_training_does_not_stop_it():
    """A condition that some early draw satisfies trains to the end."""
    lm = LMS["markov"]()

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.constraint("starts_b", x[..., 0] == 2)

    post = ppl_lm.infer(model, method="svi", num_steps=60, num_particles=8, num_samples=50, progress=False, seed=0)
    assert post.info.num_steps == 60 and len(post.info.trace["elbo"]) == 60


# -- checkpoints ------------------------------------------------------------------------------------
def sentiment_like(lm, beta=0.5, max_new_tokens=T):
    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=max_new_tokens))
        ppl_lm.reward("r", (x == 2).float().sum(-1), beta=beta)
        return x

    return model


@pytest.mark.parametrize("change,field", [
    (dict(beta=0.25), "model"),  # β closed over by the model
    (dict(max_new_tokens=T - 1), "model"),
    (dict(context=[1]), "args"),
    (dict(model_kwargs={"prompt": [3]}), "model_kwargs"),
    (dict(lm=1), "lm"),
    (dict(objective="forward"), "objective"),
])
def test_checkpoint_of_another_run_is_refused(tmp_path, change, field):
    lms = [LMS["markov"](), ppl_lm.MarkovLM.random(5, eos_id=0, seed=4)]
    base = dict(beta=0.5, max_new_tokens=T, context=None, model_kwargs=None, lm=0, objective="reverse")

    def go(**kw):
        o = {**base, **kw}
        model = sentiment_like(lms[o["lm"]], o["beta"], o["max_new_tokens"])
        args = () if o["context"] is None else (o["context"],)
        return ppl_lm.infer(model, *args, method="svi", objective=o["objective"], num_steps=4, num_particles=4,
                            num_samples=10, crosscheck_samples=0, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                            model_kwargs=o["model_kwargs"], progress=False, seed=0)

    go()
    with pytest.raises(CheckpointMismatch, match=f"differs in: .*{field}"):
        go(**change)
    again = go()  # the same run resumes at its end and trains no further
    assert again.info["start_step"] == 4 and len(again.info["trace"]["elbo"]) == 4


def test_default_guide_is_lora_for_transformers():
    tiny = LMS["transformer"]()
    model, args = soft_reward(tiny)
    assert svi.default_guide(model, args) == "lora"
    markov, _ = soft_reward(LMS["markov"]())
    assert svi.default_guide(markov, ()) == "full"
    post = ppl_lm.infer(model, *args, method="svi", num_steps=2, num_particles=4, num_samples=8,
                        crosscheck_samples=0, progress=False, seed=0)
    assert post.guide.kind == "lora" and post.info["lr"] == svi.DEFAULT_LR["lora"]


# -- the CLI's checkpoint flags -------------------------------------------------------------------
CLI_SCRIPT = '''\
import pyro
import ppl_lm

context = ()


def build(lm, beta=0.5):
    toy = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)

    def model():
        x = pyro.sample("x", toy.sequence([], max_new_tokens=3))
        ppl_lm.reward("b", (x == 2).float().sum(-1), beta=beta)
        return x

    return model
'''


def test_cli_checkpoint_dir_and_resume(tmp_path, capsys):
    from ppl_lm import cli

    script = tmp_path / "toy_svi.py"
    script.write_text(CLI_SCRIPT)
    ckpt = str(tmp_path / "ckpt")
    base = ["run", str(script), "--method", "svi", "--lm", "tiny", "--quiet", "--num-steps", "4",
            "--num-particles", "4", "--num-samples", "8", "--checkpoint-dir", ckpt]
    assert cli.main(base) == 0
    with pytest.raises(SystemExit) as e:  # an existing checkpoint is never resumed silently
        cli.main(base)
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert cli.main(base + ["--resume"]) == 0
    with pytest.raises(SystemExit) as e:  # another β is another run
        cli.main(base + ["--resume", "--set", "beta=0.25"])
    assert e.value.code != 0 and "differs in: model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(base[:-2] + ["--resume"])
    assert e.value.code == 2 and "--checkpoint-dir" in capsys.readouterr().err


def test_info_is_typed_and_reads_as_before():
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    post = ppl_lm.infer(model, *args, method="svi", num_steps=25, num_particles=8, num_samples=20,
                        crosscheck_samples=0, progress=False, seed=0)
    info = post.info
    assert isinstance(info, svi.SVIInfo) and info["trace"] is info.trace
    assert isinstance(info.elbo, float) and info.elbo == pytest.approx(float(info.trace["elbo"][-20:].mean()))
    assert len(info.kl_trace.kl_reverse) == 25 and info.crosscheck is None
    assert info.correction["num_samples"] == 20


def test_ctrl_c_checkpoints_the_step_under_way_and_resume_continues(tmp_path):
    """SIGINT at step 3 of 8, long before the first periodic checkpoint (every 50): the step finishes,
    a checkpoint of it is written, and resuming gives exactly the uninterrupted run."""
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    opts = dict(num_steps=8, num_particles=8, num_samples=64, checkpoint_every=50, progress=False, seed=0)

    def ctrl_c_at(step):
        def callback(s, guide, stats):
            if s == step:
                os.kill(os.getpid(), signal.SIGINT)
        return callback

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stop:
        ppl_lm.infer(model, *args, method="svi", checkpoint_dir=str(tmp_path), callback=ctrl_c_at(3), **opts)
    assert isinstance(stop.value, KeyboardInterrupt)
    assert stop.value.step == 3 and stop.value.checkpoint_path == str(tmp_path / svi.CHECKPOINT_FILE)
    assert torch.load(stop.value.checkpoint_path, weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back

    resumed = ppl_lm.infer(model, *args, method="svi", checkpoint_dir=str(tmp_path), **opts)
    straight = ppl_lm.infer(model, *args, method="svi", **opts)
    assert resumed.info["start_step"] == 3 and straight.info["start_step"] == 0
    for k, v in straight.guide.state_dict().items():
        assert torch.equal(resumed.guide.state_dict()[k], v), k
    assert (resumed.info["trace"]["elbo"] == straight.info["trace"]["elbo"]).all()
    assert resumed.log_evidence == straight.log_evidence
