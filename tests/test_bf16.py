"""bfloat16 LMs: the target is the bfloat16 model, and every backend stays exact for it.

- The LM conformance mixin runs on tiny transformers (Llama, Qwen2, GPT-2 and the char-level
  one) with bfloat16 weights, at its float32 tolerances: the log-softmax is taken in float32, and
  the same tokens scored along the dynamic cache and one-pass scoring give the same bfloat16
  logits on these sizes. The static cache rounds differently (one bfloat16 ulp, ``BF16_ATOL``).
- Importance sampling and SMC on the bfloat16 transformer toy match exact enumeration of the
  same bfloat16 model (the conformance table's tolerances, from the problem). On that toy
  bfloat16 and float32 differ by less than Monte Carlo error (4e-4 in log Z), so a second toy
  with a large shared logit offset makes them differ by more than twice the tolerance: the
  backends match the bfloat16 model's exact log Z there, which the float32 target would miss.
- ``dtype="auto"``'s rule, ``post.info.lm_dtype``, the checkpoint's record of the dtype and the
  CLI's ``--dtype``.
"""

from __future__ import annotations

import math

import pytest
import torch

import ppl_lm
from lm_conformance import BF16_ATOL, LMConformance
from ppl_lm.lm.hf import precision
from test_conformance import BACKENDS, failures, prior_is_ess_fraction
import test_lm
from test_lm import TransformerPrompts
from toys import PROBLEMS, transformer_lm

BF16 = torch.bfloat16


def bf16(lm):
    lm.model.to(BF16)
    return lm


def _tiny(architecture: str = "llama"):
    return bf16(ppl_lm.tiny_transformer(4, eos_id=0, seed=0, scale=0.15, architecture=architecture))


class TestBf16TinyLlama(TransformerPrompts, LMConformance):
    def make_lm(self):
        return _tiny()


class TestBf16TinyLlamaStaticCache(TransformerPrompts, LMConformance):
    atol = BF16_ATOL  # the static cache's step rounds differently from one-pass scoring (3.8e-4 seen)

    def make_lm(self):
        return _tiny().with_kv_cache("static")


class TestBf16TinyQwen2(TransformerPrompts, LMConformance):
    def make_lm(self):
        return _tiny("qwen2")


class TestBf16TinyGPT2(TransformerPrompts, LMConformance):
    def make_lm(self):
        return _tiny("gpt2")


class TestBf16TinyCharTransformer(test_lm.TestTinyCharTransformer):  # its prompts and sizes, in bfloat16
    def make_lm(self):
        return bf16(ppl_lm.tiny_char_transformer(seed=0))


def test_log_softmax_in_bf16_fails_the_normalisation_check(monkeypatch):
    """The planted bug the mixin must catch: a log-softmax taken in bfloat16 leaves rows that do
    not sum to one (8 mantissa bits), so the library takes it in float32."""
    from ppl_lm.lm.hf.model import TransformersLM

    lm = _tiny()
    state = lm.start(torch.tensor([3, 1, 2]), 4)
    torch.testing.assert_close(state.logprobs.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)
    assert state.logprobs.dtype == torch.float32
    monkeypatch.setattr(TransformersLM, "next_logprobs", lambda self, logits: torch.log_softmax(logits, -1).float())
    lm = ppl_lm.tiny_char_transformer(seed=0)  # 97 tokens: a bfloat16 sum of many terms
    bf16(lm)
    bad = lm.start(torch.tensor([1, 2]), 4).logprobs
    assert (bad.logsumexp(-1).abs() > 1e-5).any()


# -- exact for the bfloat16 model -----------------------------------------------------------------

_exact: dict = {}


def bf16_exact(problem):
    if problem not in _exact:
        model, args = PROBLEMS[problem](bf16(transformer_lm()))
        _exact[problem] = ppl_lm.infer(model, *args, method="exact")
    return _exact[problem]


def test_bf16_toy_is_another_model():
    """The bfloat16 toy's law differs from float32's (so the exact checks below are about it)."""
    model32, args = PROBLEMS["soft_reward"](transformer_lm())
    z32 = ppl_lm.infer(model32, *args, method="exact").log_evidence
    assert abs(bf16_exact("soft_reward").log_evidence - z32) > 1e-4


@pytest.mark.parametrize("problem", ["soft_reward", "hard_constraint", "token_constraint", "pin_hard"])
@pytest.mark.parametrize("method", ["importance", "smc"])
def test_bf16_backend_matches_exact_bf16_model(method, problem):
    exact = bf16_exact(problem)
    row = BACKENDS[method]
    model, args = PROBLEMS[problem](bf16(transformer_lm()))
    post = ppl_lm.infer(model, *args, method=method, seed=0, progress=False, **row.options)
    assert post.info.lm_dtype == "bfloat16" and exact.info.lm_dtype == "bfloat16"
    bad = failures(post, exact, row, prior_is_ess_fraction(exact))
    assert not bad, f"{method} on bf16 {problem}: " + "; ".join(bad)


def offset_lm(dtype):
    """The toy transformer with 160 added to every token's logit (a hidden unit times a constant
    column of the head): the offset cancels in float32's softmax, but bfloat16 rounds logits near
    160 to steps of 1, so its law differs from float32's far beyond Monte Carlo error."""
    lm = transformer_lm()
    with torch.no_grad():
        lm.model.lm_head.weight[:, 0] += 160.0
    lm.model.to(dtype)
    return lm


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_bf16_target_is_the_bf16_model_not_float32(method):
    """log Z of the token-mask problem: within 4 exact standard errors (prior IS at 20 000 samples)
    of the bfloat16 model's exact value, whose distance from float32's exceeds twice that, so a
    backend that targeted the float32 model would fail."""
    exact = {}
    for dt in (torch.float32, BF16):
        model, args = PROBLEMS["token_constraint"](offset_lm(dt))
        exact[dt] = ppl_lm.infer(model, *args, method="exact")
    f = prior_is_ess_fraction(exact[BF16])
    tol = 4 * math.sqrt((1 / f - 1) / 20_000)
    assert abs(exact[BF16].log_evidence - exact[torch.float32].log_evidence) > 2 * tol
    model, args = PROBLEMS["token_constraint"](offset_lm(BF16))
    opts = {"importance": dict(num_samples=20_000), "smc": dict(num_particles=20_000)}[method]
    post = ppl_lm.infer(model, *args, method=method, seed=0, progress=False, **opts)
    assert abs(post.log_evidence - exact[BF16].log_evidence) < tol


@pytest.mark.filterwarnings("ignore::ppl_lm.diagnostics.warnings.PplLmWarning")
def test_float32_info_records_float32():
    model, args = PROBLEMS["soft_reward"](transformer_lm())
    post = ppl_lm.infer(model, *args, method="importance", num_samples=200, seed=0, progress=False)
    assert post.info.lm_dtype == "float32"
    markov, args = PROBLEMS["soft_reward"](ppl_lm.MarkovLM.random(5, eos_id=0, seed=3))
    assert ppl_lm.infer(markov, *args, method="exact").info.lm_dtype is None  # a table has no dtype


@pytest.mark.filterwarnings("ignore::ppl_lm.diagnostics.warnings.PplLmWarning")
def test_checkpoint_records_the_dtype(tmp_path):
    lm = transformer_lm()
    model, args = PROBLEMS["soft_reward"](lm)
    opts = dict(method="svi", num_steps=2, num_samples=10, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                progress=False, seed=0)
    ppl_lm.infer(model, *args, **opts)
    bf16(lm)
    with pytest.raises(ValueError, match="lm_dtype"):
        ppl_lm.infer(model, *args, **opts)


# -- choosing the dtype ---------------------------------------------------------------------------

def test_auto_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.choose_dtype("auto", cuda)[0] == BF16
    assert precision.choose_dtype("float32", cuda)[0] == torch.float32
    assert precision.choose_dtype("bf16", cpu) == (BF16, "as asked")
    assert precision.choose_dtype(torch.float16, cpu)[0] == torch.float16
    assert precision.choose_dtype("auto", torch.device("mps"))[0] == torch.float32
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    dtype, why = precision.choose_dtype("auto", cpu)
    assert dtype == torch.float32 and "no AMX-BF16 or AVX512-BF16" in why
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda threads: 2.9)
    assert precision.choose_dtype("auto", cpu) == (BF16, "auto: avx512_bf16, bfloat16 matmul 2.9x float32")
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda threads: 1.1)
    assert precision.choose_dtype(None, cpu)[0] == torch.float32


def test_probe_and_flags_are_sane():
    assert set(precision.cpu_bf16_flags()) <= {"amx_bf16", "avx512_bf16"}
    assert 0.05 < precision.bf16_matmul_speedup(torch.get_num_threads()) < 50


def test_bad_dtype_is_a_clear_error_before_loading(monkeypatch):
    from ppl_lm.lm.hf import loading

    monkeypatch.setattr(loading, "_resolve", lambda *a: pytest.fail("resolved a model before checking the dtype"))
    with pytest.raises(ValueError, match="unknown dtype 'float8'; use one of 'auto', 'float32', 'bfloat16'"):
        ppl_lm.load_lm(dtype="float8")


def test_cli_dtype_flag(capsys, monkeypatch):
    from ppl_lm import cli

    assert cli.build_parser().parse_args(["run", "x", "--method", "smc", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "x", "--method", "smc", "--dtype", "float8"])
    err = capsys.readouterr().err
    assert "invalid choice: 'float8'" in err and all(name in err for name in precision.DTYPES)
    calls = []

    def loaded(*a):
        calls.append(a)
        raise RuntimeError("stop here")

    monkeypatch.setattr(cli, "load_language_model", loaded)
    with pytest.raises(SystemExit):
        cli.main(["run", "no_e", "--method", "smc", "--lm", "tiny", "--dtype", "bfloat16"])
    assert calls == [("tiny", None, "bfloat16")]
    monkeypatch.undo()
    assert cli.load_language_model("tiny", None, "bfloat16").dtype == BF16
    assert cli.load_language_model("tiny", None).dtype == torch.float32


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::ppl_lm.diagnostics.warnings.PplLmWarning")
def test_smollm2_in_bf16_runs_smc_with_normalised_float32_rows():
    lm = ppl_lm.load_lm(dtype="bfloat16", progress=False)
    assert lm.dtype == BF16
    state = lm.start(torch.tensor(lm.encode("Once upon a time,")), 4)
    assert state.logprobs.dtype == torch.float32
    torch.testing.assert_close(state.logprobs.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)
    from ppl_lm.models import load

    model = load("no_e").build(lm, max_new_tokens=6)
    post = ppl_lm.infer(model, "Once upon a time,", method="smc", num_particles=8, seed=0, progress=False)
    assert post.info.lm_dtype == "bfloat16" and math.isfinite(post.log_evidence)
    assert not any("e" in t.lower() for t in post.texts)
