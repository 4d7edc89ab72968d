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


# -- issue 22, item 7: small cases ------------------------------------------------------------------

def _model(lm):
    def model():
        pyro.sample("x", lm.sequence([], max_new_tokens=2))
    return model


@pytest.mark.parametrize("method, option", [
    ("importance", "num_samples"), ("importance", "chunk_size"), ("smc", "num_replicates"),
    ("mh", "num_samples"), ("svi", "num_samples"), ("exact", "max_support"), ("exact", "chunk_size"),
])
def test_true_is_not_a_count(method, option):
    """``num_samples=True`` was accepted as 1: a bool is never a positive integer."""
    with pytest.raises(ValueError, match=rf"{option} must be a positive integer.*got True|{option} must be an "
                                         r"integer >= 1, got True"):
        ppl_lm.infer(_model(toy_lm()), method=method, progress=False, **{option: True})


def test_max_new_tokens_true_is_refused():
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got True"):
        toy_lm().sequence([], max_new_tokens=True)


def test_num_steps_zero_without_a_trained_guide_is_refused():
    with pytest.raises(ValueError, match=r"num_steps=0 trains nothing: .* pass a trained guide \(guide=post.guide\)"):
        ppl_lm.infer(_model(toy_lm()), method="svi", num_steps=0, progress=False)


def test_num_steps_zero_with_a_trained_guide_weights_its_draws():
    """The documented use of num_steps=0: a trained guide's draws, importance-weighted, untouched."""
    model = _model(toy_lm())
    first = ppl_lm.infer(model, method="svi", num_steps=2, num_particles=4, num_samples=32, progress=False)
    before = {k: v.clone() for k, v in first.guide.state_dict().items()}
    again = ppl_lm.infer(model, method="svi", guide=first.guide, num_steps=0, num_samples=32, progress=False)
    assert again.info.num_steps == 0 and len(again) == 32
    assert all(torch.equal(v, first.guide.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("fn", ["forbid_chars", "only_chars"])
@pytest.mark.parametrize("chars, error, match", [
    (5, TypeError, r"chars must be a string of the characters, e.g. \w+\(lm, \"eE\"\), got int 5"),
    (None, TypeError, "got NoneType None"),
    ("", ValueError, "chars is empty"),
])
def test_char_masks_check_their_characters(fn, chars, error, match):
    with pytest.raises(error, match=match):
        getattr(ppl_lm.rewards, fn)(ppl_lm.tiny_char_transformer(seed=0), chars)


def test_set_value_of_the_wrong_type_is_refused_before_the_lm_loads(no_lm_load, capsys):
    err = cli_error(["run", "sentiment", "--method", "smc", "--lm", "tiny", "--set", "beta=abc"], capsys)
    assert "--set beta=abc: sentiment.py's build() takes a number for 'beta'; write e.g. --set beta=0.5" in err
    err = cli_error(["run", "no_e", "--method", "smc", "--lm", "tiny", "--set", "max_new_tokens=2.5"], capsys)
    assert "takes an integer for 'max_new_tokens'" in err


def test_set_value_of_a_text_option_is_the_text(monkeypatch):
    """``--set chars=5`` gives the script the text "5" (not the number 5, which forbid_chars refuses)."""
    seen = {}
    module = cli.load_script("no_e")
    kwargs = cli._build_kwargs(["chars=5", "max_new_tokens=4"])
    cli._check_build_kwargs(module, kwargs, cli._set_texts(["chars=5", "max_new_tokens=4"]))
    seen.update(kwargs)
    assert seen == {"chars": "5", "max_new_tokens": 4}


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "5"], "method 'smc' does not take --num-samples; it takes --chunk-size, --ess-threshold, --num-particles"),
    (["--chunk-size", "1"], "--method smc: chunk_size must be an integer >= 2 or None, got 1"),
    (["--resume"], "--resume applies to --method svi only"),
    (["--seed", "-1"], "--method smc: seed"),
])
def test_smc_options_are_checked_before_the_lm_loads(no_lm_load, capsys, argv, message):
    err = cli_error(["run", "no_e", "--method", "smc", "--lm", "tiny", *argv], capsys)
    assert message in err


def test_resume_without_a_checkpoint_dir_is_refused_before_the_lm_loads(no_lm_load, capsys):
    err = cli_error(["run", "no_e", "--method", "svi", "--lm", "tiny", "--resume"], capsys)
    assert "--resume needs --checkpoint-dir DIR" in err


def test_svi_options_are_checked_by_the_backend_before_the_lm_loads(no_lm_load, capsys, tmp_path):
    script = tmp_path / "m.py"
    script.write_text("context = ()\nmethods = {'svi': {'num_particles': 1}}\n"
                      "def build(lm):\n    raise AssertionError('built')\n")
    err = cli_error(["run", str(script), "--method", "svi", "--lm", "tiny"], capsys)
    assert "--method svi: num_particles must be an integer >= 2" in err


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs /sys (nobody may create folders in it)")
def test_report_into_a_folder_nobody_can_write_fails_before_the_run(no_lm_load, capsys):
    """As root, permission bits allow everything (os.access says yes), so the folder is tried."""
    err = cli_error(["run", "no_e", "--method", "smc", "--lm", "tiny", "--report", "/sys/kernel/ppl-lm-report"],
                    capsys)
    assert "--report /sys/kernel/ppl-lm-report: cannot write in /sys/kernel (" in err
    assert "give a folder you can write to" in err


@pytest.mark.parametrize("typo, near", [("smollm", "smollm2"), ("tiyn", "tiny")])
def test_a_misspelt_lm_name_says_so_with_the_nearest(no_lm_load, capsys, typo, near):
    err = cli_error(["run", "no_e", "--method", "smc", "--lm", typo], capsys)
    assert f"--lm {typo}: not a known model name or path; did you mean {near!r}?" in err
    assert "internet" not in err and "huggingface.co" not in err


def test_load_lm_of_an_unknown_name_does_not_blame_the_network(no_lm_load):
    with pytest.raises(ValueError, match=r"'smollm' is not a known model: it is not a local model folder, a .gguf "
                                         "file, or a model in the local Hugging Face cache") as err:
        ppl_lm.load_lm("smollm")
    assert "internet" not in str(err.value)


def test_compare_prints_each_failure_once(capsys):
    """exact cannot enumerate the tiny transformer: its error appears once, among the warnings."""
    with pytest.raises(SystemExit):
        cli.main(["compare", "no_e", "--methods", "exact,importance", "--lm", "tiny", "--num-samples", "8",
                  "--set", "max_new_tokens=4", "--top", "0"])
    out = capsys.readouterr()
    both = out.out + out.err
    assert both.count("more than max_support") == 1, both
    assert "exact failed (see above); the others ran" in out.err


def _readme_model_names(text: str) -> set[str]:
    names = set(re.findall(r"ppl-lm (?:run|compare) ([A-Za-z_][\w]*)\b(?!\.py)", text))
    if "| script |" in text:  # models/README.md's table of scripts
        names |= set(re.findall(r"^\| `(\w+)` \|", text.split("| script |", 1)[1], re.M))
    scripts = text.split("## Model scripts", 1)[1].split("\n## ", 1)[0] if "## Model scripts" in text else ""
    names |= set(re.findall(r"^- `(\w+)` — ", scripts, re.M))  # README.md's list of scripts
    return names


def test_the_readmes_use_the_names_ppl_lm_list_prints(capsys):
    cli.main(["list"])
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for readme in ("README.md", os.path.join("models", "README.md")):
        with open(os.path.join(root, readme), encoding="utf-8") as f:
            used = _readme_model_names(f.read()) - {"my_model", "path", "NAME"}  # placeholders
        assert used, readme
        assert used <= listed, f"{readme} names {sorted(used - listed)}, which `ppl-lm list` does not print"
