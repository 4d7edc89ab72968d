"""Integration: the embedded SmolLM2 loads offline and its samples agree with scoring."""

from __future__ import annotations

import pytest
import torch


pytestmark = pytest.mark.integration


def test_loads_offline_and_samples_agree_with_scoring(smollm2):
    lm = smollm2
    assert lm.vocab_size == 49152 and lm.eos_id == 2
    prompt = "Once upon a time"
    tokens, lps = lm.sample(prompt, 8, 12, generator=torch.Generator().manual_seed(0))
    scored = lm.token_logprobs(prompt, tokens)
    assert torch.allclose(lps, scored, atol=2e-3), (lps - scored).abs().max()
    texts = [lm.decode(r) for r in tokens.tolist()]
    assert any(len(t.strip()) > 0 for t in texts)
    assert lm.decode(lm.encode(" a little lamb")) == " a little lamb"


def test_sequence_distribution_on_smollm2(smollm2):
    d = smollm2.sequence("The capital of France is", max_new_tokens=4)
    x = torch.tensor(smollm2.encode(" Paris.") + [smollm2.eos_id] * 4)[:4]
    lp = d.log_prob(x)
    assert torch.isfinite(lp) and lp.item() > -10  # an easy continuation is likely


def test_prompt_longer_than_context(smollm2):
    with pytest.raises(ValueError, match="context window"):
        smollm2.sequence([1] * 8190, max_new_tokens=16)
