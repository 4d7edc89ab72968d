"""Chat prompts: ``ppl_lm.chat`` is the tokenizer's own template; the end of turn ends a sequence
exactly (its probability folded into EOS) where ``lm.for_chat()`` asks for it, and only there."""

from __future__ import annotations

import warnings

import pytest
import torch

import ppl_lm
from lm_conformance import LMConformance, teacher_forced
from ppl_lm.inference.exact import enumerate_sequences
from ppl_lm.lm import LoraLM
from ppl_lm.lm.testing import tiny_chat_transformer
from ppl_lm.tokens import after_eos_mask

EOS, START, END_OF_TURN, USER, ASSISTANT, NL, A, B = range(8)
CONVERSATION = [{"role": "system", "content": "b"}, {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "ba"}, {"role": "user", "content": "a"}]


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_transformer()


def _template(lm, messages, **kw):
    return list(lm.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


class TestChatLM(LMConformance):
    """The chat view is a normalised autoregressive LM whose end of turn has probability 0 as content."""

    prompts = ([], [START, USER, NL, A, B, END_OF_TURN, NL, START, ASSISTANT, NL])
    rows = ([A, B, NL], [B, B, A], [USER, NL, A], [A, A, B])
    text = "ab\na"
    enum_tokens = 3

    def make_lm(self):
        return tiny_chat_transformer().for_chat()

    def test_the_end_of_turn_is_never_content(self, lm):
        tokens, _ = self._sample(lm, self.prompts[-1], n=2000, seed=10)
        assert not (tokens == END_OF_TURN).any()
        assert (tokens[:, 0] == EOS).any()


class TestChatLMStaticCache(TestChatLM):
    """The stop tokens are folded inside the fixed-shape decode step too."""

    def make_lm(self):
        return tiny_chat_transformer().for_chat().with_kv_cache("static")


def test_template_tokens_equal_the_tokenizers(lm):
    ids = ppl_lm.chat(lm.for_chat(), "ab")
    assert ids == _template(lm, [{"role": "user", "content": "ab"}], add_generation_prompt=True)
    assert ids == [START, USER, NL, A, B, END_OF_TURN, NL, START, ASSISTANT, NL]
    assert ppl_lm.chat(lm.for_chat(), CONVERSATION) == _template(lm, CONVERSATION, add_generation_prompt=True)
    assert (ppl_lm.chat(lm.for_chat(), CONVERSATION, add_generation_prompt=False)
            == _template(lm, CONVERSATION, add_generation_prompt=False))
    with torch.no_grad():  # usable as a prompt
        x, lp = lm.sample(ids, 4, 3, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(lm.score(ids, x), lp.sum(-1))


def test_end_of_turn_is_found_from_the_template(lm):
    assert lm.eos_id == EOS and lm.stop_ids == ()
    assert lm.end_of_turn_ids() == [EOS, END_OF_TURN]
    assert lm.for_chat().stop_ids == (END_OF_TURN,)
    assert lm.for_chat(end_of_turn=None).stop_ids == ()
    assert lm.for_chat(end_of_turn=[ASSISTANT]).stop_ids == (ASSISTANT,)
    assert lm.for_chat().with_kv_cache("static").stop_ids == (END_OF_TURN,)
    assert ppl_lm.tiny_transformer().end_of_turn_ids() == [0]  # no tokenizer: the config's EOS only
    with pytest.raises(ValueError, match="end_of_turn must be"):
        lm.for_chat(end_of_turn="<|im_end|>")
    with pytest.raises(ValueError, match="not token ids of this vocabulary"):
        lm.for_chat(end_of_turn=[99])


def test_ending_at_the_end_of_turn_is_exact(lm):
    """Every sequence of up to 3 tokens: under the chat view, ending at step t has the plain LM's
    P(EOS) + P(end of turn) at t, content tokens keep their plain log-probs, and the end of turn
    as content has probability 0."""
    chat_lm = lm.for_chat()
    prompt = ppl_lm.chat(chat_lm, "ab")
    seqs = enumerate_sequences(lm.vocab_size, EOS, 3)
    with torch.no_grad():
        chat_scores = chat_lm.score(prompt, seqs)
        plain = teacher_forced(lm, prompt, seqs)  # the plain LM's next-token log-probs along seqs
    after = after_eos_mask(seqs, EOS)
    first_eos = (seqs == EOS) & ~after
    content = plain.gather(-1, seqs[..., None])[..., 0].masked_fill(after | first_eos, 0.0).sum(-1)
    ends = torch.logaddexp(plain[..., EOS], plain[..., END_OF_TURN]).masked_fill(~first_eos, 0.0).sum(-1)
    talks_on = (seqs == END_OF_TURN).any(-1)
    torch.testing.assert_close(chat_scores[~talks_on], (content + ends)[~talks_on], atol=1e-5, rtol=0)
    assert torch.isneginf(chat_scores[talks_on]).all() and talks_on.sum() > 0
    assert chat_scores.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # the plain LM is untouched: its end of turn is an ordinary token
        assert lm.score(prompt, seqs)[talks_on].isfinite().all()


def test_a_lora_guide_keeps_the_end_of_turn(lm):
    guide = LoraLM(tiny_chat_transformer().for_chat(), r=2)
    with torch.no_grad():
        state = guide.start(torch.tensor(ppl_lm.chat(guide, "ab")), 2)
    assert torch.isneginf(state.logprobs[:, END_OF_TURN]).all()
    torch.testing.assert_close(state.logprobs.logsumexp(-1), torch.zeros(2))


def test_warns_when_the_end_of_turn_does_not_end_the_sequence(lm):
    with pytest.warns(UserWarning, match=r"<\|im_end\|> do not end a sequence of this LM.*lm.for_chat\(\)"):
        ppl_lm.chat(lm, "ab")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ppl_lm.chat(lm.for_chat(), "ab")


def test_clear_errors():
    with pytest.raises(ValueError, match="has no chat template"):
        ppl_lm.chat(ppl_lm.tiny_transformer(), "Hi")
    with pytest.raises(TypeError, match="messages must be a text"):
        ppl_lm.chat(tiny_chat_transformer(), [{"content": "Hi"}])
    with pytest.raises(TypeError, match="messages must be a text"):
        ppl_lm.chat(tiny_chat_transformer(), [])


@pytest.mark.integration
def test_smollm2_template_and_end_of_turn(smollm2):
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": "Give a JSON object with a person's name and age."}]
    ids = ppl_lm.chat(smollm2, messages)
    assert ids == list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
    text = tok.decode(ids)  # not lm.decode, which stops at EOS (<|im_end|> here)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nGive a JSON object with a person's name and age.<|im_end|>\n<|im_start|>assistant\n")
    # SmolLM2-Instruct's EOS is its end of turn: the chat view is the LM itself
    assert tok.convert_ids_to_tokens(smollm2.eos_id) == "<|im_end|>"
    assert smollm2.end_of_turn_ids() == [smollm2.eos_id] and smollm2.for_chat().stop_ids == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ppl_lm.chat(smollm2, "Hi")


def test_an_svi_checkpoint_tells_the_chat_view_apart(lm):
    from ppl_lm.inference.svi.checkpoint import lm_fingerprint

    assert lm_fingerprint(lm.for_chat()) != lm_fingerprint(lm)
    assert lm_fingerprint(lm.for_chat(end_of_turn=None)) == lm_fingerprint(lm)


def test_instruct_scripts_take_their_context_as_a_chat_message(lm):
    from ppl_lm import models

    for name in ("json_person", "regex_sentence"):
        mod = models.load(name)
        assert mod.chat is True and "<|im_start|>" not in mod.context  # no hand-written special tokens
        assert models.model_args(mod, lm=lm.for_chat()) == (ppl_lm.chat(lm.for_chat(), mod.context),)
        assert models.model_args(mod) == (mod.context,)  # no LM given: the text
        assert models.model_args(mod, toy=True, lm=lm) == (mod.toy_context,)  # the tiny LM reads plain text
