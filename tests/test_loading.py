"""load_lm's GGUF cache: where it lives, that a second load reads it, and that it changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ppl_lm
from ppl_lm.lm import hf


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(hf.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert hf.cache_dir() == Path.home() / ".cache" / "ppl-lm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf.cache_dir() == tmp_path / "xdg" / "ppl-lm"
    monkeypatch.setenv(hf.CACHE_ENV, str(tmp_path / "mine"))
    assert hf.cache_dir() == tmp_path / "mine"


def test_cache_key_changes_with_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(hf.CACHE_ENV, str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF1")
    first = hf._cache_entry(str(tmp_path), "m.gguf")
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    f.write_bytes(b"GGUF22")  # another size (and mtime): another entry, never a stale cache
    assert hf._cache_entry(str(tmp_path), "m.gguf") != first


@pytest.mark.integration
def test_second_load_reads_the_cache_and_is_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv(hf.CACHE_ENV, str(tmp_path))
    first = ppl_lm.load_lm(progress=False)
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(entries[0]))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]

    import transformers.modeling_gguf_pytorch_utils as gguf

    def no_conversion(*a, **k):
        raise AssertionError("the second load converted the GGUF again")

    monkeypatch.setattr(gguf, "load_gguf_checkpoint", no_conversion)
    second = ppl_lm.load_lm(progress=False)
    prompt = "Once upon a time"
    ids = torch.tensor([second.encode(" there was")])
    assert first.encode(prompt) == second.encode(prompt) and first.eos_id == second.eos_id
    assert torch.equal(first.token_logprobs(prompt, ids), second.token_logprobs(prompt, ids))
