"""Every bad input gets a clear error that names the problem and the fix, before expensive work.

One test per case of issue 12's list. "Before expensive work" is checked by making the expensive
step (loading an LM, running a backend) fail the test if it is reached.
"""

from __future__ import annotations

import math
import os
import re

import pyro
import pytest
import torch

import ppl_lm
from ppl_lm import cli
from ppl_lm.lm import hf

KEYWORD_BUILD = ("keywords", "mode", "beta", "max_new_tokens")


@pytest.fixture
def no_lm_load(monkeypatch):
    """Loading any LM is a test failure: the error must come first."""

    def boom(*a, **k):
        raise AssertionError("the LM was loaded before the input was checked")

    monkeypatch.setattr(cli, "load_language_model", boom)
    monkeypatch.setattr(hf, "_cache_entry", boom)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def toy_lm():
    return ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)


# -- the command line ---------------------------------------------------------------------------

def test_set_with_a_misspelt_key_lists_the_valid_ones(no_lm_load, capsys):
    err = cli_error(["run", "keyword", "--method", "importance", "--lm", "tiny", "--set", "max_new_token=4"], capsys)
    assert "--set max_new_token" in err and "did you mean 'max_new_tokens'?" in err
    assert "Valid keys: " + ", ".join(KEYWORD_BUILD) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(no_lm_load, capsys):
    err = cli_error(["run", "keyword", "--method", "importance", "--lm", "tiny", "--device", "cuda"], capsys)
    assert "--device cuda" in err and "cannot be used" in err and "device='cpu'" in err
    assert "AssertionError" not in err


def test_unknown_device_name(no_lm_load, capsys):
    err = cli_error(["run", "keyword", "--method", "importance", "--device", "gpu"], capsys)
    assert "unknown device 'gpu'" in err and "'cuda'" in err


def test_report_path_that_is_a_file_is_refused_before_the_run(tmp_path, no_lm_load, capsys):
    f = tmp_path / "passwd"
    f.write_text("root:x:0:0")
    err = cli_error(["run", "keyword", "--method", "importance", "--lm", "tiny", "--report", str(f)], capsys)
    assert f"--report {f}" in err and "is not a folder" in err
    assert f.read_text() == "root:x:0:0"


def test_report_path_under_a_file_is_refused(tmp_path, no_lm_load, capsys):
    f = tmp_path / "plain"
    f.write_text("")
    err = cli_error(["run", "keyword", "--method", "importance", "--report", str(f / "sub" / "dir")], capsys)
    assert "is not a folder" in err and "cannot be created" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_report_path_without_permission(tmp_path, no_lm_load, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    err = cli_error(["run", "keyword", "--method", "importance", "--report", str(ro / "r")], capsys)
    assert "no permission to write" in err


def test_compare_with_empty_methods(no_lm_load, capsys):
    err = cli_error(["compare", "keyword", "--lm", "tiny", "--methods", ""], capsys)
    assert "--methods is empty" in err and "importance,smc" in err


def test_unknown_model_name_suggests_the_nearest(no_lm_load, capsys):
    err = cli_error(["run", "keywords", "--method", "importance"], capsys)
    assert "unknown model 'keywords'; did you mean 'keyword'?" in err


def test_models_readme_names_every_attribute_a_script_must_define():
    """The CLI refuses a script without build or context; the README must say so."""
    with open(os.path.join(os.path.dirname(ppl_lm.models.__file__), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    must = re.search(r"A script must define (.+?)\.\s", readme, re.S)
    assert must, "models/README.md does not say what a script must define"
    for attr in cli.REQUIRED_SCRIPT_ATTRS:
        assert f"`{attr}" in must.group(1), attr


# -- load_lm ----------------------------------------------------------------------------------------

def test_load_lm_on_a_missing_gguf_file(no_lm_load, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: 'missing.gguf' \(looked at .*missing.gguf\)"):
        ppl_lm.load_lm("missing.gguf")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        ppl_lm.load_lm(str(tmp_path / "nope"))


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_load_lm_on_mps_fails_before_loading(no_lm_load):
    with pytest.raises(ValueError, match="device 'mps' cannot be used: .*Use device='cpu'"):
        ppl_lm.load_lm(device="mps")


def test_load_lm_on_a_file_that_is_not_gguf(no_lm_load, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        ppl_lm.load_lm(str(f))


# -- models -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["init", "trans"])
def test_markov_lm_with_a_nan_logit(where):
    init, trans = torch.zeros(3), torch.zeros(3, 3)
    (init if where == "init" else trans)[(1,) if where == "init" else (2, 1)] = math.nan
    with pytest.raises(ValueError, match=rf"MarkovLM: {where}_logits\[(1|2, 1)\] is nan .*-inf for a token of "
                                         "probability 0"):
        ppl_lm.MarkovLM(init, trans, eos_id=0)


@pytest.mark.parametrize("method", ["importance", "smc", "exact"])
def test_pin_on_a_token_outside_the_vocabulary(method, monkeypatch):
    lm = toy_lm()

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
        ppl_lm.pin("p", x, {0: 7})

    calls = []
    real = lm.sample
    monkeypatch.setattr(lm, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match=r"pin 'p': token id 7 at position 0 is outside the vocabulary of the LM "
                                         r"that sampled x \(ids 0\.\.2\); pin token ids from lm.encode"):
        ppl_lm.infer(model, method=method, progress=False) if method != "exact" else ppl_lm.infer(model, method=method)
    # Found on the run that discovers the model's sites: no sequence sampled (exact draws one).
    assert len(calls) <= (1 if method == "exact" else 0)


@pytest.mark.parametrize("prompt", [123, 4.5, object()])
def test_prompt_that_is_not_text_or_ids(prompt):
    for lm in (toy_lm(), ppl_lm.tiny_transformer()):
        with pytest.raises(TypeError, match=r"a prompt must be text, a list of token ids or a LongTensor; got .*"
                                            r"Write lm.sequence\('text'\)"):
            lm.sequence(prompt, max_new_tokens=2)


def test_all_nan_reward_is_counted_on_the_real_batch():
    lm = toy_lm()

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
        ppl_lm.reward("r", torch.full(x.shape[:-1], math.nan), beta=1.0)

    with pytest.raises(ValueError, match=r"reward 'r' is non-finite for 16 of 16 sequences \(16 NaN; first at "
                                         r"index 0\)\. Rewards must be finite"):
        ppl_lm.infer(model, method="importance", num_samples=16, progress=False)


def test_reward_nan_for_some_sequences_counts_them():
    lm = toy_lm()

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
        i = torch.arange(x.shape[0]).float()  # one value per particle
        r = torch.where(i == 3, math.inf, torch.where(i == 5, math.nan, 0.0))
        ppl_lm.reward("r", r, beta=1.0)

    with pytest.raises(ValueError, match=r"non-finite for 2 of 10 sequences \(1 NaN, 1 \+inf; first at index 3\)"):
        ppl_lm.infer(model, method="importance", num_samples=10, progress=False)


@pytest.mark.parametrize("method", ["exact", "importance", "smc", "mh", "svi"])
def test_an_error_in_the_model_comes_out_as_raised(method):
    """Pyro's trace handlers append a "Trace Shapes" table to errors raised inside a model; the user
    gets their own error back: its type, its message and a traceback through their line."""
    lm = ppl_lm.MarkovLM.random(4, seed=0)

    class ModelBug(RuntimeError):
        pass

    def model():
        pyro.sample("x", lm.sequence([], max_new_tokens=2))
        raise ModelBug("the user's own message")

    with pytest.raises(ModelBug) as err:
        ppl_lm.infer(model, method=method, progress=False)
    assert str(err.value) == "the user's own message"
    assert any(f.name == "model" for f in err.traceback)
