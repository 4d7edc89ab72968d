"""Any causal LM of the transformers ecosystem: tiny random GPT-2, GPT-NeoX, Qwen2 and Gemma 2
networks (built offline from configs) run the LM conformance mixin, and every architecture
(Llama's conformance class is ``TestTinyTransformer`` in test_lm.py) takes one SVI step with a
LoRA guide whose targets are found from the architecture. Adding an architecture is adding a row."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch import nn

import ppl_lm
from lm_conformance import LMConformance
from ppl_lm.lm.lora import ALL_LINEAR, LoraLM, lora_targets
from ppl_lm.lm.testing import ARCHITECTURES

#: The attention projections LoRA adapts by default, per architecture (peft's table).
EXPECTED_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
}
PROMPT = [3, 1, 2]


def _tiny(architecture: str):
    return ppl_lm.tiny_transformer(4, eos_id=0, seed=0, scale=0.15, architecture=architecture)


class ArchitecturePrompts:
    prompts = ([], PROMPT)
    rows = ([1, 2, 3], [3, 3, 1], [2, 1, 1], [1, 1, 2])
    text = "cab"


class TestTinyGPT2(ArchitecturePrompts, LMConformance):
    def make_lm(self):
        return _tiny("gpt2")


class TestTinyGPTNeoX(ArchitecturePrompts, LMConformance):
    def make_lm(self):
        return _tiny("gpt_neox")


class TestTinyQwen2(ArchitecturePrompts, LMConformance):
    def make_lm(self):
        return _tiny("qwen2")


class TestTinyGemma2(ArchitecturePrompts, LMConformance):
    """Sliding-window layers (window 4) alternate with global ones: the conformance prompts and
    continuations (up to 9 tokens) go past the window."""

    def make_lm(self):
        return _tiny("gemma2")


def test_the_table_covers_every_architecture():
    assert set(EXPECTED_TARGETS) == set(ARCHITECTURES)
    for architecture in ARCHITECTURES:
        assert _tiny(architecture).model.config.model_type == architecture


def _model(lm):
    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=4))
        ppl_lm.reward("ones", (x == 1).float().sum(-1), beta=1.0)
        return x

    return model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_svi_step_with_a_lora_guide(architecture):
    """The default targets are the architecture's attention projections; one step moves the
    adapter (B starts at 0) and leaves the prior bit-identical."""
    lm = _tiny(architecture)
    assert lora_targets(lm.model) == EXPECTED_TARGETS[architecture]
    tokens = ppl_lm.inference.exact.enumerate_sequences(4, 0, 4)
    with torch.no_grad():
        prior_before = lm.score(PROMPT, tokens)
    post = ppl_lm.infer(_model(lm), PROMPT, method="svi", guide="lora", num_steps=1, num_particles=8,
                        num_samples=8, progress=False, seed=0)
    guide_lm = post.guide.lm
    assert isinstance(guide_lm, LoraLM) and guide_lm.target_modules == EXPECTED_TARGETS[architecture]
    adapted = {n.rsplit(".", 3)[-4].rsplit(".", 1)[-1] for n in guide_lm.params}
    assert adapted == set(EXPECTED_TARGETS[architecture]), adapted
    lora_b = [p for n, p in guide_lm.params.items() if "lora_B" in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b), "the step did not move the adapter"
    with torch.no_grad():
        assert torch.equal(lm.score(PROMPT, tokens), prior_before)
        assert not torch.allclose(guide_lm.score(PROMPT, tokens), prior_before)


def test_all_linear_adapts_every_linear_layer_but_the_head():
    lm = _tiny("gpt2")
    guide = LoraLM(lm, r=2, target_modules=ALL_LINEAR)
    adapted = {n.split(".ppl_lm_")[0].split(".lora_")[0] for n in guide.params}
    assert not any(n.startswith("lm_head") for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"c_attn", "c_proj", "c_fc"}


def test_unknown_architectures_fall_back_to_every_linear_layer():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.out = nn.Linear(4, 4), nn.Linear(4, 4)

    assert lora_targets(Block()) == ALL_LINEAR
    # a Llama-like network whose model_type peft does not know is still found by its names
    lm = _tiny("qwen2")
    lm.model.config.model_type = "qwen_unreleased"
    assert lora_targets(lm.model) == ["q_proj", "v_proj"]


def test_wrong_targets_are_a_clear_error_naming_the_fix():
    """GPT-2 with Llama's names used to fail SVI with peft's raw NoMatchingPeftModuleError."""
    lm = _tiny("gpt2")
    with pytest.raises(ValueError, match=r"no module of this gpt2 network.*c_attn.*--lora-targets"):
        LoraLM(lm, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"did you mean 'c_attn'"):
        LoraLM(lm, target_modules=["c_atn"])
    with pytest.raises(TypeError, match="lora_targets must be"):
        LoraLM(lm, target_modules=[3])
    # peft's own errors (a regex matching nothing; a layer type LoRA cannot adapt) are rewritten
    with pytest.raises(ValueError, match=r"LoRA could not adapt this gpt2 network.*c_attn.*--lora-targets"):
        LoraLM(lm, target_modules=r".*q_proj")
    with pytest.raises(ValueError, match=r"LoRA could not adapt this gpt2 network.*--lora-targets"):
        LoraLM(lm, target_modules=["ln_f"])
    with pytest.raises(ValueError, match="--lora-targets"):
        ppl_lm.infer(_model(lm), PROMPT, method="svi", guide="lora", lora_targets=["q_proj"], num_steps=1,
                     num_particles=4, num_samples=4, progress=False, seed=0)
