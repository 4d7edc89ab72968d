"""Data-parallel SVI (ppl_lm.inference.svi.distributed): two gloo processes == one process, exactly.

The particles of a step are drawn in seeded blocks, so two processes (one block each) and one
process running both blocks draw the same particles; the gradient of the pooled RLOO surrogate
is then the same up to floating-point summation order. Checked against the RLOO formula of
``ppl_lm.inference.svi.elbo`` recomputed here on the pooled particles.
"""

from __future__ import annotations

import pyro
import pytest
import torch

import gloo
import ppl_lm
from ppl_lm import seeding as _random
from ppl_lm.inference.svi.distributed import DistributedLoss, block_seed, train
from ppl_lm.inference.svi.elbo import particle_terms
from ppl_lm.inference.svi.guides import make_guide

N, STEPS, SEED = 8, 6, 3


def toy():
    lm = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=4))
        ppl_lm.reward("r", (x == 2).float().sum(-1) - 0.3 * ppl_lm.rewards.length(lm, x), beta=0.5)
        return x

    return model


def one_step_grads(model, blocks: int | None):
    """Gradients of the guide after one DistributedRLOO_ELBO step (in this process's group)."""
    pyro.clear_param_store()
    with _random.seeded(SEED):
        guide = make_guide(model, (), kind="full")
    elbo = DistributedLoss(N, SEED, num_blocks=blocks)
    elbo.loss_and_grads(model, guide, ())
    grads = {k: p.grad.detach().clone() for k, p in guide.module.named_parameters()}
    values = torch.cat([v["x"] for v in elbo.last_values])
    return grads, values, dict(elbo.last)


def _worker(rank: int, world_size: int) -> dict:
    model = toy()
    grads, values, stats = one_step_grads(model, None)
    pyro.clear_param_store()
    res = train(model, (), num_steps=STEPS, num_particles=N, guide="full", seed=SEED, progress=False)
    return {"grads": grads, "values": values, "stats": stats, "trace": res.trace,
            "params": res.guide.state_dict(), "info": res.info}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return gloo.spawn(_worker, tmp_path_factory.mktemp("ddp"))


def test_block_seeds_are_distinct_and_independent_of_world_size():
    seeds = {block_seed(0, s, b) for s in range(50) for b in range(8)}
    assert len(seeds) == 400
    assert block_seed(1, 0, 0) != block_seed(0, 0, 0)


def test_two_processes_equal_one_process(two_process_run):
    r0, r1 = two_process_run
    model = toy()
    grads, values, stats = one_step_grads(model, blocks=2)
    # same particles: rank r drew block r of the single-process step
    assert torch.equal(torch.cat([r0["values"], r1["values"]]), values)
    for k, g in grads.items():
        torch.testing.assert_close(r0["grads"][k], g, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1["grads"][k], g, rtol=1e-5, atol=1e-6)  # replicas agree
    assert r0["stats"]["elbo"] == pytest.approx(stats["elbo"], rel=1e-9, abs=1e-9)

    pyro.clear_param_store()
    ref = train(model, (), num_steps=STEPS, num_particles=N, guide="full", seed=SEED, num_blocks=2,
                progress=False)
    assert r0["info"]["world_size"] == 2 and ref.info["world_size"] == 1
    for k in ("elbo", "kl_prior", "reward:r"):
        torch.testing.assert_close(torch.as_tensor(r0["trace"][k]), torch.as_tensor(ref.trace[k]),
                                   rtol=1e-5, atol=1e-6)
    for k, v in ref.guide.state_dict().items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["params"][k], r1["params"][k])  # replicas stay identical


def test_global_baseline_is_rloo_on_the_pooled_particles():
    """The blocked gradient equals −∇ mean_i[(f_i − mean_{j≠i} f_j)·log q(x_i)] on all N particles."""
    model = toy()
    grads, values, _ = one_step_grads(model, blocks=2)
    pyro.clear_param_store()
    with _random.seeded(SEED):
        guide = make_guide(model, (), kind="full")
    terms = particle_terms(model, guide, (), {}, N, values={"x": values})
    f = terms.f.double()
    loo = (f.sum() - f) / (N - 1)
    surrogate = -((f - loo).float() * terms.log_q).mean()
    surrogate.backward()
    for k, p in guide.module.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 1e-3 for g in grads.values())  # a real gradient, not zeros


def test_local_baseline_with_contexts_is_per_block_rloo():
    model = toy()
    contexts = [(), ([1],), ([2],)]
    pyro.clear_param_store()
    with _random.seeded(SEED):
        guide = make_guide(model, (), kind="full")
    elbo = DistributedLoss(N, SEED, num_blocks=2, contexts=contexts)
    assert elbo.baseline == "local"
    elbo.loss_and_grads(model, guide)
    got = {k: p.grad.detach().clone() for k, p in guide.module.named_parameters()}
    # recompute: each block's context is drawn from the block's own seed
    for p in guide.module.parameters():
        p.grad = None
    n = N // 2
    total = 0.0
    for b in range(2):
        with _random.seeded(block_seed(SEED, 0, b)):
            i = int(torch.randint(len(contexts), (1,), generator=_random.generator("cpu")))
        terms = particle_terms(model, guide, contexts[i], {}, n, values={"x": elbo.last_values[b]["x"]})
        f = terms.f.double()
        loo = (f.sum() - f) / (n - 1)
        total = total - ((f - loo).float() * terms.log_q).sum() / N
    total.backward()
    for k, p in guide.module.named_parameters():
        torch.testing.assert_close(p.grad, got[k], rtol=1e-5, atol=1e-7)


def test_bad_options():
    with pytest.raises(ValueError, match="divisible"):
        DistributedLoss(9, 0, num_blocks=2)
    with pytest.raises(ValueError, match="baseline"):
        DistributedLoss(8, 0, baseline="median")
    with pytest.raises(ValueError, match="at least 2 particles per block"):
        DistributedLoss(4, 0, num_blocks=4, baseline="local")
    with pytest.raises(ValueError, match="num_particles"):
        train(toy(), (), num_particles=1, guide="full")


def test_seed_reaches_the_lora_initialisation():
    """The runner builds its guide under the user's seed (it used to build every LoRA guide
    from seed 0): two seeds give two initialisations, one seed the same one."""
    lm = ppl_lm.tiny_transformer(5, eos_id=0, seed=1, scale=0.15)

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt) or [1], max_new_tokens=3))
        ppl_lm.reward("r", (x == 2).float().sum(-1), beta=1.0)
        return x

    a = {k: v for k, v in train(model, (), num_steps=0, seed=1, progress=False).guide.state_dict().items()
         if "lora_A" in k}
    b = {k: v for k, v in train(model, (), num_steps=0, seed=2, progress=False).guide.state_dict().items()
         if "lora_A" in k}
    c = {k: v for k, v in train(model, (), num_steps=0, seed=1, progress=False).guide.state_dict().items()
         if "lora_A" in k}
    assert a and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_same_defaults_as_method_svi():
    """One loop, one set of defaults: guide kind, step size, its decay and the norm clip."""
    import inspect

    from ppl_lm.inference import svi

    run, tr = inspect.signature(svi.run).parameters, inspect.signature(train).parameters
    for name in ("guide", "objective", "lr", "lr_decay", "clip_norm", "relax_penalty", "num_particles",
                 "lora_r", "lora_alpha", "checkpoint_every"):
        assert run[name].default == tr[name].default, name
    lm = ppl_lm.tiny_transformer(5, eos_id=0, seed=1, scale=0.15)

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt) or [1], max_new_tokens=3))
        ppl_lm.reward("r", (x == 2).float().sum(-1), beta=1.0)
        return x

    res = train(model, (), num_steps=2, num_particles=4, progress=False)
    assert res.guide.kind == "lora" and res.info["lr"] == svi.DEFAULT_LR["lora"]


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    model = toy()
    pyro.clear_param_store()
    straight = train(model, (), num_steps=STEPS, num_particles=N, guide="full", seed=SEED, progress=False)
    pyro.clear_param_store()
    with pytest.raises(_Stop):  # killed after step 3; the checkpoint holds step 2
        train(model, (), num_steps=STEPS, num_particles=N, guide="full", seed=SEED, progress=False,
              checkpoint_dir=str(tmp_path), checkpoint_every=2, callback=_stop_after(3))
    pyro.clear_param_store()
    resumed = train(model, (), num_steps=STEPS, num_particles=N, guide="full", seed=SEED, progress=False,
                    checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert resumed.info["start_step"] == 2
    for k, v in straight.guide.state_dict().items():
        assert torch.equal(resumed.guide.state_dict()[k], v), k
    assert (resumed.trace["elbo"] == straight.trace["elbo"]).all()


class _Stop(Exception):
    pass


def _stop_after(n):
    def cb(step, stats):
        if step + 1 >= n:
            raise _Stop

    return cb
