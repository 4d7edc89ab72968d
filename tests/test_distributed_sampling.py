"""Importance sampling and SMC across processes (ppl_lm.inference.distributed): two gloo processes
give what one process gives, sample for sample and log Z included.

Each run is made of parts (importance chunks, SMC islands) that draw from their own seeds, so rank r
of 2 computes parts r, r+2, ...; rank 0 gathers and pools them with the single-process code. The
check: the same samples and weights, and log Z equal to 1e-9, against a single-process run with
the same seed and chunk size; and the importance log Z within 4.5 standard errors of the exact one,
the standard error from the problem (the exact ESS of prior importance sampling, by enumeration).
Planted bugs (a rank's islands counted twice; each rank's log Ẑ pooled, then averaged in log space)
fail the check.
"""

from __future__ import annotations

import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist

import gloo
import ppl_lm
from ppl_lm.inference import distributed, shards

SEED = 5
N_IS, CHUNK_IS = 2000, 500  # 4 chunks: 2 per rank
N_SMC, CHUNK_SMC = 600, 150  # 4 islands of 150 particles: 2 per rank


def toy():
    """A discrete world (drawn from its prior: the global RNG) and a sequence under its prompt."""
    lm = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)

    def model():
        w = pyro.sample("w", dist.Categorical(torch.tensor([0.3, 0.7])))
        x = pyro.sample("x", lm.sequence((w + 1).unsqueeze(-1), max_new_tokens=4))
        ppl_lm.reward("r", (x == 2).float().sum(-1) - 0.3 * ppl_lm.rewards.length(lm, x), beta=0.5)
        return x

    return model


RUNS = {
    "importance": dict(method="importance", num_samples=N_IS, chunk_size=CHUNK_IS),
    "smc": dict(method="smc", num_particles=N_SMC, chunk_size=CHUNK_SMC),
    "smc_default_chunk": dict(method="smc", num_particles=N_SMC),
}


class DoubleCounting(distributed.TorchShard):
    """Planted bug: rank 1's islands reach the pool twice."""

    def gather(self, parts):
        out = super().gather(parts)
        return None if out is None else out + [out[i] for i in range(1, len(out), self.size)]


class LocalOnly(distributed.TorchShard):
    """Planted bug, first half: each rank pools only its own parts (its own log Ẑ)."""

    def gather(self, parts):
        return [parts[i] for i in sorted(parts)]


def _summary(post) -> dict:
    return {"samples": post.samples, "values": dict(post.values), "log_weights": post.log_weights,
            "log_evidence": post.log_evidence, "log_evidence_se": post.log_evidence_se,
            "chunk_size": post.info.chunk_size}


def _worker(rank: int, world_size: int) -> dict:
    model, out = toy(), {}
    for name, opts in RUNS.items():
        post = distributed.run(model, seed=SEED, progress=False, **opts)
        assert (post is None) == (rank != 0)  # gathered to rank 0 only
        out[name] = None if post is None else _summary(post)
    everywhere = distributed.run(model, seed=SEED, progress=False, dst=None, **RUNS["smc"])
    out["dst_none"] = _summary(everywhere)
    for name in ("importance", "smc"):
        opts = RUNS[name]
        with shards.sharded(DoubleCounting()):
            post = ppl_lm.infer(model, seed=SEED, progress=False, **opts)
        out[f"double_{name}"] = None if post is None else _summary(post)
        # each rank pools its own half (rescaled to its share of the particles), then the
        # ranks' log Ẑ are averaged in log space
        with shards.sharded(LocalOnly()):
            post = ppl_lm.infer(model, seed=SEED, progress=False, **opts)
        local = torch.tensor([post.log_evidence + math.log(world_size)], dtype=torch.float64)
        every = [torch.zeros(1, dtype=torch.float64) for _ in range(world_size)]
        tdist.all_gather(every, local)
        out[f"logmean_{name}"] = float(torch.cat(every).mean())
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return gloo.spawn(_worker, tmp_path_factory.mktemp("dist_sampling"))


@pytest.fixture(scope="module")
def single():
    model = toy()
    out = {name: _summary(ppl_lm.infer(model, seed=SEED, progress=False, **opts))
           for name, opts in RUNS.items() if name != "smc_default_chunk"}
    return out


def mismatches(got: dict, ref: dict) -> list[str]:
    """What differs between a distributed run and the single-process one (empty: the same run)."""
    out = []
    if got["samples"].shape != ref["samples"].shape or not torch.equal(got["samples"], ref["samples"]):
        out.append("samples")
    elif not torch.equal(got["values"]["w"], ref["values"]["w"]):
        out.append("world values")
    elif not torch.allclose(got["log_weights"], ref["log_weights"], rtol=0, atol=1e-9):
        out.append("weights")
    if abs(got["log_evidence"] - ref["log_evidence"]) > 1e-9:
        out.append(f"log Z {got['log_evidence']:.6f} vs {ref['log_evidence']:.6f}")
    if abs(got["log_evidence_se"] - ref["log_evidence_se"]) > 1e-9:
        out.append("standard error")
    return out


@pytest.mark.parametrize("name", ["importance", "smc"])
def test_two_processes_equal_one_process(two_ranks, single, name):
    r0, r1 = two_ranks
    assert r1[name] is None  # samples are gathered to rank 0
    assert mismatches(r0[name], single[name]) == []
    assert mismatches(r0["dst_none"], single["smc"]) == [] and mismatches(r1["dst_none"], single["smc"]) == []


def test_importance_log_evidence_against_exact(two_ranks):
    """The pooled importance log Z is within 4.5 standard errors of the exact one; the error from
    the problem: the exact variance of the prior importance weights, by enumeration."""
    exact = ppl_lm.infer(toy(), method="exact")
    log_prior = exact.stats["log_prior"].double()
    log_w = exact.stats["log_likelihood"].double()
    m1, m2 = torch.logsumexp(log_prior + log_w, 0), torch.logsumexp(log_prior + 2 * log_w, 0)
    ess_fraction = float(torch.exp(2 * m1 - m2))
    se = math.sqrt((1 / ess_fraction - 1) / N_IS)
    assert abs(two_ranks[0]["importance"]["log_evidence"] - exact.log_evidence) < 4.5 * se


def test_default_chunk_splits_the_particles_over_the_ranks(two_ranks):
    got = two_ranks[0]["smc_default_chunk"]
    assert got["chunk_size"] == N_SMC // 2  # one island per rank
    ref = _summary(ppl_lm.infer(toy(), method="smc", num_particles=N_SMC, chunk_size=N_SMC // 2, seed=SEED,
                                progress=False))
    assert mismatches(got, ref) == []


@pytest.mark.parametrize("name", ["importance", "smc"])
def test_planted_bugs_fail(two_ranks, single, name):
    r0 = two_ranks[0]
    assert mismatches(r0[f"double_{name}"], single[name])  # a rank's parts counted twice
    if name == "smc":  # SMC's islands carry their share: Ẑ comes out 6/4 too large
        assert r0["double_smc"]["log_evidence"] - single["smc"]["log_evidence"] == pytest.approx(math.log(6 / 4),
                                                                                               abs=0.1)
    logmean = r0[f"logmean_{name}"]
    assert abs(logmean - single[name]["log_evidence"]) > 1e-6  # Jensen's gap: log of the mean != mean of logs


@pytest.mark.filterwarnings("ignore::ppl_lm.diagnostics.warnings.PplLmWarning")  # 200 particles
def test_one_process_without_a_group_is_infer():
    model = toy()
    a = distributed.run(model, method="smc", num_particles=200, chunk_size=100, seed=1, progress=False)
    b = ppl_lm.infer(model, method="smc", num_particles=200, chunk_size=100, seed=1, progress=False)
    assert mismatches(_summary(a), _summary(b)) == []


@pytest.mark.filterwarnings("ignore::ppl_lm.diagnostics.warnings.PplLmWarning")  # 200 particles
def test_islands_draw_the_same_wherever_they_run():
    """The single-process shard hook: skipping island 0 does not change what island 1 draws."""
    model = toy()

    class Skip0(shards.Shard):
        def owns(self, part):
            return part != 0

        def gather(self, parts):
            self.parts = parts
            return None

    full = Skip0()
    with shards.sharded(full):
        assert ppl_lm.infer(model, method="smc", num_particles=200, chunk_size=100, seed=1, progress=False) is None
    ref = ppl_lm.infer(model, method="smc", num_particles=200, chunk_size=100, seed=1, progress=False)
    assert torch.equal(full.parts[1].scores.values["x"], ref.samples[100:])


def test_bad_input():
    with pytest.raises(ValueError, match="importance or smc"):
        distributed.run(toy(), method="mh")
    with pytest.raises(ValueError, match="dst=3"):
        distributed.TorchShard(0, 2, dst=3)
    with pytest.raises(TypeError, match="Shard"):
        with shards.sharded(object()):
            pass


# -- the command line -------------------------------------------------------------------------------
CLI = ["run", "no_e", "--method", "smc", "--lm", "tiny", "--set", "max_new_tokens=4", "--num-particles", "40",
       "--chunk-size", "20", "--seed", "2", "--top", "3", "--quiet"]


def _result_lines(text: str) -> list[str]:
    """The printed summary and top samples, without the wall time (the one line that may differ)."""
    return [line.split(", wall time")[0] for line in text.splitlines() if line.strip()]


def test_torchrun_entry_point_prints_the_single_process_result(capsys):
    """``torchrun --nproc_per_node=2 -m ppl_lm.inference.distributed run ...`` (gloo) prints, on rank 0
    only, what ``ppl-lm run`` prints in one process with the same seed and chunk size."""
    import subprocess
    import sys

    from ppl_lm import cli

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29621",
                          "-m", "ppl_lm.inference.distributed", *CLI], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert cli.main(CLI) == 0
    single = capsys.readouterr().out
    assert "method smc, samples 40" in single
    assert _result_lines(out.stdout) == _result_lines(single)  # rank 1 printed nothing


def test_entry_point_errors(capsys):
    assert distributed.main(["run", "no_e", "--method", "mh", "--lm", "tiny"]) == 2
    assert "takes importance, smc, svi" in capsys.readouterr().err
    assert distributed.main(["run", "no_e", "--method", "smc", "--lm", "tiny", "--out", "g.pt"]) == 2
    assert "--out saves an SVI guide" in capsys.readouterr().err
    assert distributed.main(["sample", "no_e"]) == 2
    assert "the command is `run`" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["svi", "importance", "smc"])
def test_entry_point_refuses_contexts_before_the_lm_loads(method, tmp_path, capsys, monkeypatch):
    """``--contexts FILE`` is not shared over processes (SVI ignored it; every rank ran every context of
    importance and smc): refused, before the LM loads, svi with the words of ``ppl-lm run``."""
    from ppl_lm import cli

    monkeypatch.setattr(cli, "load_language_model", lambda *a, **k: pytest.fail("the LM loaded"))
    path = tmp_path / "contexts.txt"
    path.write_text("Once upon a time\nThe cat sat\n")
    argv = ["run", "no_e", "--method", method, "--lm", "tiny", "--quiet", "--contexts", str(path)]
    assert distributed.main(argv) == 2
    err = capsys.readouterr().err
    if method == "svi":
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert err == "error: " + capsys.readouterr().err.removeprefix("ppl-lm: error: ")
        assert "method 'svi' takes contexts= as its own option" in err
    else:
        assert "--contexts FILE is not shared over processes" in err
        assert "`ppl-lm run MODEL --contexts FILE` in one process" in err
    assert distributed.main([*argv, "--context", "Hi"]) == 2
    assert "give the contexts once" in capsys.readouterr().err
