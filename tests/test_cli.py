"""The ppl-lm command, run in-process: user scripts, model names, compare + report, errors."""

from __future__ import annotations

import importlib.util
import json
import re
import textwrap

import pytest
import torch

import ppl_lm
from ppl_lm import cli

TOY_SCRIPT = '''\
import pyro
import ppl_lm

description = "toy: reward the letter e"
context = "The cat"
toy_context = "Hi"
methods = {"importance": {"num_samples": 32}}


def build(lm, beta=1.0, max_new_tokens=4):
    e = lm.encode("e")[0]

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        ppl_lm.reward("e", (x == e).float().sum(-1), beta=beta)
        return x

    return model
'''

MARKOV_SCRIPT = '''\
import pyro
import ppl_lm

context = ()


def build(lm, beta=0.5):
    toy = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)  # an exact toy LM: enumeration is the reference

    def model():
        x = pyro.sample("x", toy.sequence([], max_new_tokens=3))
        ppl_lm.reward("b", (x == 2).float().sum(-1), beta=beta)
        return x

    return model
'''


_lms: dict = {}


@pytest.fixture(autouse=True)
def cached_lm(monkeypatch):
    """Build the tiny LM once for the whole module (the CLI builds it on every call)."""
    real = cli.load_language_model

    def load(spec, device, dtype=None):
        if (spec, device, dtype) not in _lms:
            _lms[spec, device, dtype] = real(spec, device, dtype)
        return _lms[spec, device, dtype]

    monkeypatch.setattr(cli, "load_language_model", load)


def script(tmp_path, text, name="toy.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def available(methods):
    return [m for m in methods if importlib.util.find_spec(f"ppl_lm.inference.{m}") is not None]


# -- run ----------------------------------------------------------------------------------------

def test_run_user_script_end_to_end(tmp_path, capsys):
    path = script(tmp_path, TOY_SCRIPT)
    out = tmp_path / "rep"
    assert cli.main(["run", path, "--method", "importance", "--lm", "tiny", "--seed", "3", "--quiet",
                     "--report", str(out)]) == 0
    stdout = capsys.readouterr().out
    # The same run in code: the script's toy_context and default options, the same seed.
    lm = _lms["tiny", None, None]
    ns = {}
    exec(compile(TOY_SCRIPT, path, "exec"), ns)
    post = ppl_lm.infer(ns["build"](lm), "Hi", method="importance", seed=3, num_samples=32, progress=False)
    assert f"log Z {post.log_evidence:.4f} ± {post.log_evidence_se:.4f}" in stdout
    assert "method importance, samples 32" in stdout and f"ESS {post.ess:.1f}" in stdout
    assert "top samples" in stdout
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["num_samples"] == 32 and rows[0]["seed"] == 3
    assert rows[0]["log_evidence"] == pytest.approx(post.log_evidence)
    assert f"report: {out.absolute() / 'report.html'}" in stdout
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "toy: reward the letter e\nContext: &#x27;Hi&#x27;. LM: tiny." in html


def test_build_kwargs_flags_and_context(tmp_path, capsys):
    path = script(tmp_path, TOY_SCRIPT)
    out = tmp_path / "rep"
    assert cli.main(["run", path, "--method", "importance", "--lm", "tiny", "--quiet", "--num-samples", "12",
                     "--set", "max_new_tokens=2", "--context", "Yo", "--report", str(out), "--top", "0"]) == 0
    row = json.loads((out / "summary.json").read_text())["rows"][0]
    assert row["num_samples"] == 12  # the flag overrides the script's default of 32
    assert row["means"]["length"] <= 2.0
    assert "top samples" not in capsys.readouterr().out


def test_run_model_by_name(capsys):
    assert cli.main(["run", "prefix", "--method", "importance", "--lm", "tiny", "--num-samples", "4",
                     "--quiet", "--set", "max_new_tokens=3"]) == 0
    assert "prefix: method importance, samples 4" in capsys.readouterr().out


def test_chunk_size_flag_reaches_the_backend(tmp_path, monkeypatch, capsys):
    path = script(tmp_path, TOY_SCRIPT)
    seen, real = [], ppl_lm.infer
    monkeypatch.setattr(ppl_lm, "infer", lambda *a, **k: seen.append(k) or real(*a, **k))
    assert cli.main(["run", path, "--method", "smc", "--lm", "tiny", "--quiet", "--num-particles", "40",
                     "--chunk-size", "16", "--set", "max_new_tokens=3", "--top", "0"]) == 0
    assert seen[-1]["chunk_size"] == 16 and seen[-1]["num_particles"] == 40
    assert "samples 40" in capsys.readouterr().out
    err = fails(["run", path, "--method", "mh", "--lm", "tiny", "--chunk-size", "16"], capsys)
    assert "method 'mh' does not take --chunk-size" in err



def test_lora_targets_flag_reaches_the_guide(tmp_path, monkeypatch, capsys):
    path = script(tmp_path, TOY_SCRIPT)
    # a fresh LM per call: LoRA adapters stay injected in the network they adapt
    monkeypatch.setattr(cli, "load_language_model", lambda spec, device, dtype=None: ppl_lm.tiny_char_transformer(seed=0))
    seen, real = [], ppl_lm.infer  # svi calls infer again inside: the CLI's call is the first of each run
    monkeypatch.setattr(ppl_lm, "infer", lambda *a, **k: seen.append(k) or real(*a, **k))
    svi = ["run", path, "--method", "svi", "--lm", "tiny", "--quiet", "--num-steps", "1", "--num-particles", "4",
           "--num-samples", "4", "--set", "max_new_tokens=2", "--top", "0"]
    assert cli.main([*svi, "--lora-targets", "q_proj,o_proj"]) == 0
    assert seen[0]["lora_targets"] == ["q_proj", "o_proj"]
    seen.clear()
    assert cli.main([*svi, "--lora-targets", "all-linear"]) == 0
    assert seen[0]["lora_targets"] == "all-linear"
    err = fails([*svi, "--lora-targets", "c_attn"], capsys)  # GPT-2's name on a Llama
    assert "no module of this llama network is named so" in err and "q_proj" in err
    assert "comma-separated names" in fails([*svi, "--lora-targets", "q proj"], capsys)
    err = fails(["run", path, "--method", "importance", "--lm", "tiny", "--lora-targets", "c_attn"], capsys)
    assert "does not take --lora-targets" in err and "(--lora-targets is an option of svi)" in err


CHAT_SCRIPT = '''\
import pyro
import ppl_lm

context = "ab"


def build(lm, max_new_tokens=3):
    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        ppl_lm.reward("a", (x == 6).float().sum(-1), beta=1.0)
        return x

    return model
'''


def test_chat_flag_wraps_the_context_and_ends_at_the_end_of_turn(tmp_path, monkeypatch, capsys):
    from ppl_lm.lm.testing import tiny_chat_transformer

    lm = tiny_chat_transformer()  # EOS <|endoftext|> (0), end of turn <|im_end|> (2)
    monkeypatch.setattr(cli, "load_language_model", lambda spec, device, dtype=None: lm)
    monkeypatch.setattr(cli, "_check_lm", lambda spec: None)  # "chatty" names the stand-in LM above
    seen, real = [], ppl_lm.infer
    monkeypatch.setattr(ppl_lm, "infer", lambda *a, **k: seen.append((a, real(*a, **k))) or seen[-1][1])
    path = script(tmp_path, CHAT_SCRIPT)
    run = ["run", path, "--method", "importance", "--num-samples", "256", "--lm", "chatty", "--quiet", "--top", "0"]
    assert cli.main(run) == 0
    (args, plain) = seen[-1]
    assert args[1] == "ab" and (plain.samples == 2).any()  # without --chat the turn runs on
    assert cli.main([*run, "--chat"]) == 0
    (args, chat) = seen[-1]
    assert args[1] == ppl_lm.chat(lm.for_chat(), "ab") == [1, 3, 5, 6, 7, 2, 5, 1, 4, 5]
    assert not (chat.samples == 2).any() and (chat.samples[:, 0] == 0).any()
    # clear errors, before any LM loads where the flags alone say so
    assert "the tiny LM (--lm tiny) has no chat template" in fails(
        ["run", path, "--method", "importance", "--lm", "tiny", "--chat"], capsys)
    assert "--chat wraps the context (a text)" in fails([*run, "--chat", "--context", "15"], capsys)
    monkeypatch.setattr(cli, "load_language_model", lambda spec, device, dtype=None: ppl_lm.tiny_transformer(8))
    assert "--chat: this TransformersLM has no chat template" in fails([*run, "--chat"], capsys)

def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ppl_lm.models.names():
        assert re.search(rf"^{name}\s+\S", out, re.M), name
    assert ppl_lm.models.load("sentiment").description in out


# -- compare ------------------------------------------------------------------------------------

def test_compare_with_exact_reference(tmp_path, capsys):
    path = script(tmp_path, MARKOV_SCRIPT, "markov.py")
    methods = available(["exact", "importance", "smc", "mh", "svi"])
    out = tmp_path / "cmp"
    assert cli.main(["compare", path, "--methods", ",".join(methods), "--num-samples", "20", "--num-particles",
                     "8", "--num-chains", "2", "--warmup-steps", "3", "--num-steps", "5", "--quiet",
                     "--report", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert list(rows) == methods  # exact first, as the reference row
    assert rows["exact"]["tv_to_exact"] == 0.0
    for m in methods[1:]:
        assert 0.0 <= rows[m]["tv_to_exact"] <= 1.0
    if "mh" in rows:
        assert rows["mh"]["num_chains"] == 2 and rows["mh"]["num_samples"] == 40
    if "importance" in rows:
        assert rows["importance"]["num_samples"] == 20
    stdout = capsys.readouterr().out
    for m in methods:
        assert re.search(rf"^{m}: method {m}", stdout, re.M)


def test_compare_goes_on_when_one_method_fails(tmp_path, capsys):
    path = script(tmp_path, TOY_SCRIPT)
    out = tmp_path / "cmp"
    # exact cannot enumerate a 96-token vocabulary: it fails with a clear error, importance still runs.
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", path, "--methods", "exact,importance", "--lm", "tiny", "--num-samples", "8",
                  "--quiet", "--report", str(out)])
    assert e.value.code == 2
    printed = capsys.readouterr()
    # the error once, among the warnings before the results; the last line says that it failed
    assert (printed.out + printed.err).count("the joint support has") == 1
    assert "WARNING [failed] exact: The run failed: ValueError: the joint support has" in printed.out
    assert "exact failed (see above)" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["importance"]
    # The failure does not vanish: the title keeps both methods and the warnings list it, first.
    assert summary["title"].endswith(": exact, importance")
    failed = [w for w in summary["warnings"] if w["code"] == "failed"]
    assert [w["backend"] for w in failed] == ["exact"] and "the joint support has" in failed[0]["message"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.index("The run failed: ValueError: the joint support has") < html.index("<h2>Summary</h2>")


def test_compare_prints_warnings_before_the_results(tmp_path, capsys, monkeypatch):
    from ppl_lm.diagnostics import InferenceWarning

    path = script(tmp_path, MARKOV_SCRIPT, "markov.py")
    real = ppl_lm.infer

    def warned(*a, **k):
        post = real(*a, **k)
        if k.get("method") == "smc":
            post.warnings.append(InferenceWarning("path_degeneracy", "Few lineages.", "More particles."))
        return post

    monkeypatch.setattr(ppl_lm, "infer", warned)
    assert cli.main(["compare", path, "--methods", "importance,smc", "--num-samples", "64", "--num-particles", "64",
                     "--quiet", "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert out.index("WARNING [path_degeneracy] smc: Few lineages.\n    what to do: More particles.") \
        < out.index("importance: method importance")


def test_compare_rejects_unknown_method(tmp_path, capsys):
    path = script(tmp_path, MARKOV_SCRIPT, "markov.py")
    err = fails(["compare", path, "--methods", "importance,magic"], capsys)
    assert "unknown method 'magic'" in err and "importance, smc" in err


# -- errors -------------------------------------------------------------------------------------

BROKEN = {
    "runtime": ('''\
        import pyro
        import ppl_lm
        context = "Hi"
        def build(lm):
            def model(prompt):
                x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=2))
                ppl_lm.reward("r", x.float().sum(-1) / undefined_name, beta=1.0)
                return x
            return model
        ''', 7, "NameError: name 'undefined_name' is not defined"),
    "import": ('''\
        import pyro
        context = "Hi"
        table = {"a": 1}["b"]
        def build(lm):
            return None
        ''', 3, "KeyError: 'b'"),
    "build": ('''\
        context = "Hi"

        def build(lm, beta=1.0):
            if beta > 0:
                raise ValueError("beta too large for this toy")
        ''', 5, "ValueError: beta too large for this toy"),
    "syntax": ('''\
        context = "Hi"
        def build(lm)
            return 1
        ''', 2, "SyntaxError"),
    "bad_reward": ('''\
        import pyro
        import ppl_lm
        context = "Hi"
        def build(lm):
            def model(prompt):
                x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=2))
                ppl_lm.reward("r", x.float().sum(-1), beta=-1.0)
                return x
            return model
        ''', 7, "beta"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_script_errors_point_at_the_users_line(tmp_path, capsys, case):
    text, line, message = BROKEN[case]
    path = script(tmp_path, text, "bad.py")
    err = fails(["run", path, "--method", "importance", "--lm", "tiny", "--num-samples", "4", "--quiet"], capsys)
    first = err.splitlines()[0]
    assert first.startswith(f"error in bad.py:{line}: "), err
    assert message in first
    assert "Traceback" not in err


def test_traceback_flag_shows_the_real_exception(tmp_path):
    path = script(tmp_path, BROKEN["runtime"][0], "bad.py")
    with pytest.raises(NameError):
        cli.main(["run", path, "--method", "importance", "--lm", "tiny", "--num-samples", "4", "--quiet",
                  "--traceback"])


def test_unknown_model_lists_the_models(capsys):
    err = fails(["run", "no_such_model", "--method", "importance"], capsys)
    assert "unknown model 'no_such_model'" in err
    for name in ppl_lm.models.names():
        assert name in err


def test_unknown_method(tmp_path, capsys):
    err = fails(["run", script(tmp_path, TOY_SCRIPT), "--method", "magic", "--lm", "tiny"], capsys)
    assert "unknown method 'magic'; choose one of exact, importance, smc, mh, svi" in err


def test_option_the_method_does_not_take(tmp_path, capsys):
    err = fails(["run", script(tmp_path, TOY_SCRIPT), "--method", "importance", "--num-chains", "3",
                 "--lm", "tiny"], capsys)
    assert "method 'importance' does not take --num-chains; it takes --chunk-size, --num-samples" in err


def test_script_without_build(tmp_path, capsys):
    err = fails(["run", script(tmp_path, "context = 'Hi'\n", "nobuild.py"), "--method", "importance"], capsys)
    assert "nobuild.py does not define `build`" in err


def test_missing_file_and_bad_flags(tmp_path, capsys):
    assert "no such model script" in fails(["run", str(tmp_path / "nope.py"), "--method", "importance"], capsys)
    assert "positive integer" in fails(["run", "prefix", "--method", "importance", "--num-samples", "0"], capsys)
    assert "KEY=VALUE" in fails(["run", script(tmp_path, TOY_SCRIPT), "--method", "importance", "--lm", "tiny",
                                 "--set", "oops"], capsys)


def test_lm_choice_reaches_load_lm(monkeypatch):
    calls = []
    monkeypatch.undo()  # drop the autouse cache: test the real function
    monkeypatch.setattr(ppl_lm, "load_lm", lambda *a, **k: calls.append((a, k)) or "LM")
    assert cli.load_language_model("smollm2", None) == "LM"
    assert cli.load_language_model("/models/my-lm", "cuda") == "LM"
    assert calls == [((), {}), (("/models/my-lm",), {"device": "cuda"})]
    assert cli.build_parser().parse_args(["run", "x", "--method", "mh"]).lm == "smollm2"


@pytest.mark.integration
def test_run_on_embedded_smollm2(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_language_model", lambda spec, device, dtype=None: smollm2)
    assert cli.main(["run", "prefix", "--method", "importance", "--num-samples", "4", "--set",
                     "max_new_tokens=4", "--quiet"]) == 0
    out = capsys.readouterr().out
    # The prefix model has no condition: the prompted LM is the posterior, weights are uniform. Four
    # draws give no error bar, and the run says it is too small to trust.
    assert ("prefix: method importance, samples 4, log Z 0.0000 ± — (4.0 effective draws, fewer than 10), "
            "ESS 4.0") in out
    assert "can be trusted: no — too few draws (4 draws, 4 effective)" in out


SIGINT_SCRIPT = '''
import os, signal
import pyro
import ppl_lm

context = ()
CALLS = 0  # a module global, not a closure cell: not part of the checkpoint's model fingerprint


def build(lm):
    base = ppl_lm.MarkovLM.random(4, seed=0)

    def model():
        global CALLS
        CALLS += 1
        if CALLS == int(os.environ.get("PPL_LM_TEST_SIGINT_AT", "0")):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, in the middle of training
        x = pyro.sample("x", base.sequence([], max_new_tokens=3))
        ppl_lm.reward("ones", (x == 1).float().sum(-1), beta=1.0)
    return model
'''


def test_ctrl_c_in_svi_checkpoints_and_resume_continues(tmp_path, capsys, monkeypatch):
    path = script(tmp_path, SIGINT_SCRIPT)
    ckpt = tmp_path / "ckpt"
    argv = ["run", path, "--method", "svi", "--lm", "tiny", "--num-steps", "12", "--num-particles", "4",
            "--num-samples", "16", "--quiet", "--top", "3"]
    monkeypatch.setenv("PPL_LM_TEST_SIGINT_AT", "12")
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--checkpoint-dir", str(ckpt)])
    assert e.value.code == 130
    err = capsys.readouterr().err
    found = re.search(r"interrupted after svi step (\d+), checkpointed in (\S+): run the same command with "
                      r"--resume to continue", err)
    assert found and found.group(2) == str(ckpt), err
    step = int(found.group(1))
    assert 0 < step < 12 and torch.load(ckpt / "svi_checkpoint.pt", weights_only=True)["step"] == step

    monkeypatch.delenv("PPL_LM_TEST_SIGINT_AT")
    assert cli.main([*argv, "--checkpoint-dir", str(ckpt), "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert cli.main(argv) == 0
    straight = capsys.readouterr().out

    def numbers(out):  # the summary without its wall time
        return re.sub(r", wall time [\d.]+ s", "", out)

    assert numbers(resumed) == numbers(straight) and "method svi" in straight


def test_threads_sets_torchs_thread_count_before_the_lm_loads(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)

    def loaded(*a, **k):
        calls.append("lm")
        raise RuntimeError("stop here")

    monkeypatch.setattr(cli, "load_language_model", loaded)
    fails(["run", "no_e", "--method", "smc", "--lm", "tiny", "--threads", "3"], capsys)
    assert calls == [3, "lm"]
    err = fails(["run", "no_e", "--method", "smc", "--lm", "tiny", "--threads", "0"], capsys)
    assert "argument --threads: expected a positive integer, got 0" in err


def test_run_contexts_with_a_backend_that_owns_contexts_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """--contexts FILE gives one result per context; a backend whose own contexts= option means something
    else (SVI: one guide amortised over them) is refused before the LM loads, and the run exits 2."""
    monkeypatch.setattr(cli, "load_language_model", lambda *a, **k: pytest.fail("the LM loaded"))
    path = tmp_path / "contexts.txt"
    path.write_text("Once upon a time\nThe cat sat\n")
    err = fails(["run", "no_e", "--lm", "tiny", "--method", "svi", "--num-steps", "2", "--quiet",
                 "--contexts", str(path)], capsys)
    assert "method 'svi' takes contexts= as its own option" in err
    assert "ppl_lm.infer(model, ..., method='svi', contexts=[...]) from Python" in err
