"""inference/TEMPLATE.py and every registered backend keep the one backend contract."""

from __future__ import annotations

import importlib
import inspect

import pyro
import pytest

import ppl_lm
from ppl_lm.infer import METHODS, backend_options
from ppl_lm.posterior import Info

MODULES = [f"ppl_lm.inference.{m}" for m in METHODS] + ["ppl_lm.inference.TEMPLATE"]


@pytest.mark.parametrize("name", MODULES)
def test_run_has_the_shared_signature(name):
    run = importlib.import_module(name).run
    params = list(inspect.signature(run).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "args"] and params[1].kind is params[1].VAR_POSITIONAL
    options = {p.name: p for p in params[2:]}
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in options.values()), name
    assert options["seed"].default == 0 and options["model_kwargs"].default is None


@pytest.mark.parametrize("name", MODULES)
def test_run_facts_are_a_frozen_info(name):
    module = importlib.import_module(name)
    infos = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Info) and v is not Info
             and v.__module__ == module.__name__]
    assert infos, f"{name} defines no Info subclass"
    for cls in infos:
        assert cls.__dataclass_params__.frozen, cls


def test_template_is_not_registered():
    from ppl_lm.inference import TEMPLATE

    assert "template" not in METHODS and TEMPLATE.METHOD == "template"
    with pytest.raises(ValueError, match="unknown inference method 'template'"):
        ppl_lm.infer(lambda: None, method="template")
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        TEMPLATE.run(lambda: None, num_samples=0)


def test_described_backends_declare_kind_info_and_options():
    from ppl_lm import backends

    for name in METHODS:
        b = backends.get(name)
        assert isinstance(b.kind, backends.Kind) and issubclass(b.info, Info), name
        assert dataclasses_fields(b.options) == tuple(backend_options(name)), name
        assert all(o.help for o in b.option_specs()), f"{name}: an option without a line in run's Args"


def dataclasses_fields(cls) -> tuple[str, ...]:
    import dataclasses

    return tuple(f.name for f in dataclasses.fields(cls))


TOY_SCRIPT = '''\
import pyro
import ppl_lm

context = ()
methods = {"mycopy": {"num_samples": 500}}
LM = ppl_lm.MarkovLM.random(4, eos_id=0, seed=0)


def build(lm):
    def model():
        x = pyro.sample("x", LM.sequence([], max_new_tokens=3))
        ppl_lm.reward("twos", (x == 2).float().sum(-1), beta=1.0)
        return x
    return model
'''


def test_a_copy_of_the_template_is_one_file_plus_a_row(tmp_path, monkeypatch, capsys):
    """'One file plus a row': TEMPLATE.py copied into a module of its own and registered runs in
    infer, the CLI's run and compare (its flags generated), the report and ArviZ, with no other edit."""
    import shutil
    import sys

    from ppl_lm import backends, cli

    src = importlib.import_module("ppl_lm.inference.TEMPLATE").__file__
    shutil.copy(src, tmp_path / "my_backend_copy.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        backends.register("mycopy", "my_backend_copy")
        assert "mycopy" in METHODS and backends.get("mycopy").kind is backends.Kind.WEIGHTED
        lm = ppl_lm.MarkovLM.random(4, eos_id=0, seed=0)

        def model():
            x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
            ppl_lm.reward("twos", (x == 2).float().sum(-1), beta=1.0)

        post = ppl_lm.infer(model, method="mycopy", num_samples=4000, progress=False, seed=1)
        exact = ppl_lm.infer(model, method="exact")
        assert post.method == "mycopy" and post.kind is backends.Kind.WEIGHTED
        # log Z: prior IS at N = 4000 on this problem has se < 0.02; 0.1 is > 5 se
        assert abs(post.log_evidence - exact.log_evidence) < 0.1
        idata = post.to_inference_data()
        assert "posterior" in idata.groups()
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            ppl_lm.infer(model, method="mycopy", num_samples=True)

        script = tmp_path / "toy.py"
        script.write_text(TOY_SCRIPT)
        assert cli.main(["run", str(script), "--method", "mycopy", "--lm", "tiny", "--quiet",
                         "--num-samples", "300", "--top", "0"]) == 0
        assert "method mycopy, samples 300" in capsys.readouterr().out
        out = tmp_path / "report"
        assert cli.main(["compare", str(script), "--methods", "exact,mycopy", "--lm", "tiny", "--quiet",
                         "--top", "0", "--report", str(out)]) == 0
        assert "mycopy" in (out / "report.html").read_text()
    finally:
        backends.unregister("mycopy")
        sys.modules.pop("my_backend_copy", None)
    assert "mycopy" not in METHODS


def test_an_undescribed_backend_is_refused(tmp_path, monkeypatch):
    from ppl_lm import backends

    (tmp_path / "bare_backend.py").write_text("def run(model, *args, seed=0, model_kwargs=None):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="decorate it with @ppl_lm.backends.describe"):
        backends.register("bare", "bare_backend")
    assert "bare" not in METHODS


def test_a_misnamed_contexts_function_is_a_clear_error(tmp_path, monkeypatch):
    """@describe(contexts="...") naming no function of the module: register names the backend and the
    function; so does get for a module registered before the name broke."""
    import sys

    from ppl_lm import backends

    src = importlib.import_module("ppl_lm.inference.TEMPLATE").__file__
    text = open(src).read().replace("\n@describe(", '\n@describe(contexts="run_contextz", ', 1)
    assert '@describe(contexts="run_contextz", kind=' in text
    (tmp_path / "misnamed_backend.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(TypeError, match=r"backend 'misnamed'.*contexts='run_contextz'.*misnamed_backend has no "
                                            r"function 'run_contextz'"):
            backends.register("misnamed", "misnamed_backend")
        assert "misnamed" not in METHODS
        monkeypatch.setitem(backends._registry, "misnamed", "misnamed_backend")  # e.g. a BUILTIN row
        backends.get.cache_clear()
        with pytest.raises(TypeError, match=r"backend 'misnamed'.*has no function 'run_contextz'"):
            ppl_lm.infer(lambda: None, method="misnamed")
    finally:
        backends.get.cache_clear()
        sys.modules.pop("misnamed_backend", None)
    with pytest.raises(TypeError, match="contexts= names the backend module's function"):
        backends.describe(kind=backends.Kind.WEIGHTED, info=object, contexts=len)
