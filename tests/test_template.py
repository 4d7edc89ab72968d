"""inference/TEMPLATE.py and every registered backend keep the one backend contract."""

from __future__ import annotations

import importlib
import inspect

import pytest

import ppl_lm
from ppl_lm.infer import METHODS
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
