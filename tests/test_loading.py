"""load_lm's GGUF cache: where it lives, that a second load reads it, that it changes nothing, and
that it heals (truncated, altered, deleted and read-only entries), on small files and on SmolLM2."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ppl_lm
from ppl_lm.lm import cache, hf


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
    first = hf.cache_entry(str(tmp_path), "m.gguf")
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    f.write_bytes(b"GGUF22")  # another size (and mtime): another entry, never a stale cache
    assert hf.cache_entry(str(tmp_path), "m.gguf") != first


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


# -- the healing cache, on a small safetensors file ----------------------------------------------

WEIGHTS = "model.safetensors"


class Store:
    """A value built, saved and read as a cache entry; counts how often it is built."""

    def __init__(self):
        self.builds = 0

    def build(self):
        self.builds += 1
        g = torch.Generator().manual_seed(0)
        return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}

    @staticmethod
    def save(value, folder: Path):
        save_file(value, str(folder / WEIGHTS))
        (folder / "config.json").write_text('{"kind": "toy"}')

    @staticmethod
    def read(folder: Path):
        return load_file(str(folder / WEIGHTS))

    def fetch(self, entry: Path):
        return cache.fetch(entry, build=self.build, save=self.save, read=self.read, what="the toy weights")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == cache.__name__]


@pytest.fixture
def entry(tmp_path):
    return tmp_path / "cache" / "toy-0123"


def test_an_entry_records_each_file_size_and_hash(entry):
    store = Store()
    value = store.fetch(entry)
    record = json.loads((entry / cache.MANIFEST).read_text())
    assert sorted(record["files"]) == ["config.json", WEIGHTS]
    import hashlib

    data = (entry / WEIGHTS).read_bytes()
    assert record["files"][WEIGHTS] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert cache.problem(entry) is None
    assert same(store.fetch(entry), value) and store.builds == 1  # the second fetch reads the entry
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary folder left


def _truncate(entry):
    f = entry / WEIGHTS
    f.write_bytes(f.read_bytes()[:100])


def _alter(entry):  # one byte of a weight, same size: only the hash can tell
    f = entry / WEIGHTS
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _delete(entry):
    (entry / WEIGHTS).unlink()


def _unrecorded(entry):  # an entry written before entries had a record (or cut short before it)
    (entry / cache.MANIFEST).unlink()
    _truncate(entry)


@pytest.mark.parametrize("damage, why", [
    (_truncate, f"{WEIGHTS} has 100 bytes where"),
    (_alter, f"{WEIGHTS} is not the file that was written (its SHA-256 differs)"),
    (_delete, f"{WEIGHTS} is missing"),
    (_unrecorded, f"it has no {cache.MANIFEST} recording its files"),
])
def test_a_broken_entry_is_rebuilt_once_with_a_notice_naming_it(entry, caplog, damage, why):
    store = Store()
    value = store.fetch(entry)
    damage(entry)
    assert why in cache.problem(entry)
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        healed = store.fetch(entry)
    assert same(healed, value) and store.builds == 2
    [notice] = notices(caplog)
    assert notice.startswith(f"the cached the toy weights in {entry} is broken (") and why in notice
    assert notice.endswith("rebuilding it once") and "\n" not in notice
    assert "permission" not in notice and "writable" not in notice  # a missing file is not a permission problem
    assert cache.problem(entry) is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        assert same(store.fetch(entry), value)
    assert store.builds == 2 and not notices(caplog)  # rebuilt once, not on every run
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_a_safetensors_error_is_never_raised(entry, caplog):
    """A whole, recorded entry that still fails to read (here: a header the reader rejects, rewritten
    along with its record) is rebuilt, never shown as a raw SafetensorError."""
    store = Store()
    value = store.fetch(entry)
    f = entry / WEIGHTS
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not a header!!!!")
    record = json.loads((entry / cache.MANIFEST).read_text())
    import hashlib

    record["files"][WEIGHTS] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (entry / cache.MANIFEST).write_text(json.dumps(record))
    with pytest.raises(Exception, match="Error") as raw:
        Store.read(entry)
    assert "safetensors" in type(raw.value).__module__.lower() or "Safetensor" in type(raw.value).__name__
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        assert same(store.fetch(entry), value)
    [notice] = notices(caplog)
    assert f"in {entry} is broken (it cannot be read: SafetensorError" in notice
    assert same(Store.read(entry), value)  # replaced, though its old files matched their record
    assert same(store.fetch(entry), value) and store.builds == 2


def _read_only(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_converts_in_memory(entry, caplog):
    _read_only(entry.parent)
    try:
        store = Store()
        with caplog.at_level(logging.WARNING, logger=cache.__name__):
            value = store.fetch(entry)
            again = store.fetch(entry)
    finally:
        entry.parent.chmod(0o700)
    assert same(value, again) and store.builds == 2 and not entry.exists()
    assert len(notices(caplog)) == 2
    assert notices(caplog)[0] == (
        f"the cache folder {entry.parent} is not writable (Permission denied), so the toy weights was "
        f"converted in memory for this run only and the next run converts it again; set {cache.CACHE_ENV} to a "
        "writable folder to keep it")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/sys/kernel"),
                    reason="needs /sys (a folder nobody can write, root included)")
def test_an_unwritable_cache_converts_in_memory_even_for_root(caplog):
    entry = Path("/sys/kernel/ppl-lm-cache/toy-0123")
    store = Store()
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        value = store.fetch(entry)
    assert same(value, Store().build()) and not entry.exists()
    [notice] = notices(caplog)
    assert notice.startswith("the cache folder /sys/kernel/ppl-lm-cache ")
    assert "converted in memory for this run only and the next run converts it again" in notice


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_whole_entry_in_a_read_only_cache_is_read(entry, caplog):
    store = Store()
    value = store.fetch(entry)
    _read_only(entry.parent)
    entry.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with caplog.at_level(logging.WARNING, logger=cache.__name__):
            assert same(store.fetch(entry), value)
    finally:
        entry.chmod(0o700)
        entry.parent.chmod(0o700)
    assert store.builds == 1 and not notices(caplog)


def test_a_failed_write_leaves_nothing_behind(entry, caplog):
    store = Store()

    def save_then_fail(value, folder):
        Store.save(value, folder)
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        value = cache.fetch(entry, build=store.build, save=save_then_fail, read=Store.read, what="the toy weights")
    assert same(value, Store().build())
    assert list(entry.parent.iterdir()) == []
    [notice] = notices(caplog)
    assert f"the cache folder {entry.parent} could not be written (No space left on device)" in notice


def test_an_entry_another_process_finished_first_is_kept(entry):
    store = Store()
    store.fetch(entry)
    before = (entry / cache.MANIFEST).stat().st_mtime_ns
    cache.write(entry, lambda folder: Store.save(Store().build(), folder))  # arrives second: the whole one stays
    assert (entry / cache.MANIFEST).stat().st_mtime_ns == before and cache.problem(entry) is None


# -- the healing cache on the embedded model --------------------------------------------------------

@pytest.mark.integration
def test_load_lm_heals_a_truncated_and_a_deleted_cache_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(hf.CACHE_ENV, str(tmp_path))
    first = ppl_lm.load_lm(progress=False)
    [entry] = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    weights = entry / "model.safetensors"
    prompt, ids = "Once upon a time", torch.tensor([first.encode(" there was")])
    expected = first.token_logprobs(prompt, ids)
    for damage in ("truncate", "delete"):
        if damage == "truncate":
            with open(weights, "r+b") as fh:
                fh.truncate(weights.stat().st_size // 2)
        else:
            weights.unlink()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=cache.__name__):
            healed = ppl_lm.load_lm(progress=False)
        [notice] = notices(caplog)
        assert f"in {entry} is broken (model.safetensors" in notice and "rebuilding it once" in notice
        assert torch.equal(healed.token_logprobs(prompt, ids), expected)
        assert cache.problem(entry) is None

    import transformers.modeling_gguf_pytorch_utils as gguf

    def no_conversion(*a, **k):
        raise AssertionError("a healed cache converted the GGUF again")

    monkeypatch.setattr(gguf, "load_gguf_checkpoint", no_conversion)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        again = ppl_lm.load_lm(progress=False)
    assert not notices(caplog) and torch.equal(again.token_logprobs(prompt, ids), expected)
