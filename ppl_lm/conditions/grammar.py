"""Grammar masks: regular expressions, Lark grammars and JSON schemas as exact token constraints.

The condition a :class:`GrammarMask` expresses is: the decoded text of ``x``, up to EOS or
``max_new_tokens``, is a sentence of the language (``re.fullmatch`` semantics for a regex). The
engine is llguidance (an Earley parser over a derivative-based lexer, with exact byte-level token
masks). Its parser state travels with each SMC particle (:class:`GrammarState`: one matcher per
row, copied on resampling); EOS is allowed only where the text is complete, and at the last
position only tokens after which it is complete. Finished sequences are checked with the same
matchers (:meth:`GrammarMask.check`), through a trie of parser states keyed by token prefixes, so
sequences sharing a prefix (resampled particles, MH edits of a suffix) fork one state.

Every tokenisation of an admissible text is admissible: llguidance's canonical forcing of fixed
strings (which would allow only the tokenizer's own split of a literal) is turned off with its
``no_forcing`` option. Special tokens other than EOS (``<|im_start|>`` ...) are never allowed:
they are control symbols, not text.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import numpy as np
import torch

from .masks import MaskState, TokenMask

__all__ = ["LOOKAHEAD_TOKENS", "GrammarMask", "GrammarState", "grammar_mask", "json_mask", "regex_mask"]

# At the last position the tokens that complete the text are found by trying each allowed token
# (about 1-2 µs each); above this many allowed tokens the state allows them all instead, and a
# sequence left incomplete fails ``check`` (exact either way: the weights use the set proposed from).
LOOKAHEAD_TOKENS = 4096
# Parser states kept by ``check`` (one per distinct token prefix; about 6 KiB each for a JSON
# schema); the trie restarts when full, so memory stays below ~200 MiB.
TRIE_NODES = 32_768
_OPTIONS = '%llguidance {"no_forcing": true}\n'
_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _llg():
    try:
        import llguidance
        import llguidance.torch
    except ImportError as err:  # pragma: no cover - a runtime dependency
        raise ImportError("grammar masks need llguidance (pip install llguidance)") from err
    return llguidance


class _ToyTokenizer:
    """llguidance's view of a vocabulary given as token strings (toy LMs): bytes per token."""

    def __init__(self, lm):
        texts = lm.token_texts()
        self.eos_token_id = lm.eos_id
        self.bos_token_id = None
        # A token with no text (EOS, or an unused id) is a special token: never part of the text.
        self.special_token_ids = [i for i, s in enumerate(texts) if i == lm.eos_id or not s]
        self.tokens = [b"\xff[special %d]" % i if i in self.special_token_ids else s.encode() for i, s in
                       enumerate(texts)]
        self._lm = lm

    def __call__(self, s) -> list[int]:
        # Only used by llguidance to tokenise forced text, which no_forcing turns off.
        return self._lm.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s)


def _tokenizer(lm):
    """llguidance's tokenizer for ``lm`` (built once per LM: about a second for a 50k vocabulary)."""
    tok = _TOKENIZERS.get(lm)
    if tok is None:
        llg = _llg()
        hf = getattr(lm, "tokenizer", None)
        if hf is not None:
            import llguidance.hf

            tok = llguidance.hf.from_tokenizer(hf, n_vocab=lm.vocab_size, eos_token=lm.eos_id)
        else:
            tok = llg.LLTokenizer(llg.TokenizerWrapper(_ToyTokenizer(lm)), n_vocab=lm.vocab_size)
        _TOKENIZERS[lm] = tok
    return tok


class _Node:
    """A trie node: the parser state after a token prefix (``None``: the prefix is inadmissible)."""

    __slots__ = ("children", "matcher")

    def __init__(self, matcher):
        self.matcher = matcher
        self.children: dict[int, _Node] = {}


class GrammarMask(TokenMask):
    """A token mask from a grammar in llguidance's format (see :func:`regex_mask`,
    :func:`grammar_mask`, :func:`json_mask`, which build one).

    Args:
        lm: the LM whose tokens are masked (a Hugging Face tokenizer, or token strings for toy LMs).
        grammar: llguidance grammar text (Lark syntax, or its JSON grammar format).
        what: how the user wrote it, for error messages.

    Raises:
        ValueError: the grammar does not compile (the engine's message is included).
    """

    def __init__(self, lm, grammar: str, what: str = "grammar"):
        super().__init__(lm)
        llg = _llg()
        self._tok = _tokenizer(lm)
        err = llg.LLMatcher.validate_grammar(grammar, self._tok)
        if err:
            raise ValueError(f"{what} is not a grammar llguidance accepts: {err}")
        self._root = llg.LLMatcher(self._tok, grammar, log_level=0)
        if self._root.is_error():
            raise ValueError(f"{what} is not a grammar llguidance accepts: {self._root.get_error()}")
        self.what = what
        self._executor = llg.LLExecutor(1)  # one thread: the machine's cores belong to torch
        self._trie = _Node(self._root)
        self._nodes = 1

    def __repr__(self) -> str:
        return f"GrammarMask({self.what})"

    # -- SMC: one parser state per particle ------------------------------------------------
    def start(self, batch_size: int) -> GrammarState:
        return GrammarState(self, [self._root.deep_copy() for _ in range(batch_size)])

    def allowed(self, prefix: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, V]``: the allowed next tokens after each prefix ``[B, t]`` (no EOS inside)."""
        state = self.start(prefix.shape[0])
        for t in range(prefix.shape[-1]):
            state.advance(prefix[:, t])
        return state.allowed().to(prefix.device)

    # -- every backend: the finished text is a sentence ---------------------------------------
    def check(self, x: torch.Tensor, complete: bool = True) -> torch.Tensor:
        """``ok`` ``[...]`` for sequences ``[..., T]``.

        ``complete=True``: the text up to the first EOS (or all ``T`` tokens) is a sentence.
        ``complete=False`` (a prefix): some continuation of it is a sentence.
        """
        flat = x.reshape(-1, x.shape[-1]).tolist()
        eos = self.lm.eos_id
        out = []
        for row in flat:
            n = row.index(eos) if eos in row else len(row)
            node = self._walk(row[:n])
            if node.matcher is None:
                out.append(False)
            elif complete or n < len(row):
                out.append(node.matcher.is_accepting())
            else:
                out.append(True)
        return torch.tensor(out, dtype=torch.bool, device=x.device).reshape(x.shape[:-1])

    def _walk(self, tokens: list[int]) -> _Node:
        if self._nodes > TRIE_NODES:
            self._trie, self._nodes = _Node(self._root), 1
        node = self._trie
        for tok in tokens:
            child = node.children.get(tok)
            if child is None:
                m = None
                if node.matcher is not None:
                    m = node.matcher.deep_copy()
                    if not m.consume_token(tok):
                        m = None
                child = node.children[tok] = _Node(m)
                self._nodes += 1
            node = child
            if node.matcher is None:
                break
        return node


class GrammarState(MaskState):
    """One llguidance matcher per row (a row whose text left the language holds ``None``)."""

    def __init__(self, mask: GrammarMask, matchers: list):
        self.mask = mask
        self.matchers = matchers
        self.done = [False] * len(matchers)

    def allowed(self, last: bool = False) -> torch.Tensor:
        llg = _llg()
        V, eos = self.mask.lm.vocab_size, self.mask.lm.eos_id
        B = len(self.matchers)
        bits = llg.torch.allocate_token_bitmask(B, V)
        bits.zero_()
        live = [(m, i) for i, m in enumerate(self.matchers) if m is not None and not self.done[i]]
        if live:
            llg.torch.fill_next_token_bitmask_par(self.mask._executor, live, bits)
        # llguidance's bitmask: token i is bit i % 32 of word i // 32, i.e. bit i % 8 of byte i // 8
        # (little-endian); numpy unpacks it in one C loop (20x faster than shifts in torch).
        out = torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :V]
                               .view(np.bool_))
        done = [i for i, d in enumerate(self.done) if d]
        if done:
            out[done, eos] = True  # a finished row reads EOS padding
        if last:
            for m, i in live:
                out[i] = self._completing(m, out[i], eos)
        return out

    @staticmethod
    def _completing(m, row: torch.Tensor, eos: int) -> torch.Tensor:
        """The allowed tokens after which the text is complete (all allowed ones if too many)."""
        cand = row.nonzero()[:, 0].tolist()
        if len(cand) > LOOKAHEAD_TOKENS:
            return row
        keep = torch.zeros_like(row)
        for tok in cand:
            if tok == eos:
                keep[tok] = True
            elif m.consume_token(tok):
                keep[tok] = m.is_accepting()
                m.rollback(1)
        return keep

    def advance(self, tokens: torch.Tensor) -> None:
        eos = self.mask.lm.eos_id
        for i, tok in enumerate(tokens.tolist()):
            m = self.matchers[i]
            if self.done[i] or m is None:
                continue
            if tok == eos:
                self.done[i] = True
            elif not m.consume_token(tok):
                self.matchers[i] = None

    def reorder(self, index: torch.Tensor) -> None:
        seen: set[int] = set()
        matchers, done = [], []
        for j in index.tolist():
            m = self.matchers[j]
            if j in seen and m is not None:
                m = m.deep_copy()  # a particle copied twice needs its own parser state
            seen.add(j)
            matchers.append(m)
            done.append(self.done[j])
        self.matchers, self.done = matchers, done


def _lark_regex(pattern: str) -> str:
    return "/" + pattern.replace("/", "\\/") + "/"


def regex_mask(lm, pattern: str) -> GrammarMask:
    """Token mask: the decoded text fully matches ``pattern`` (``re.fullmatch`` semantics).

    The engine's regex dialect is Rust's ``regex`` crate minus anchors: character classes,
    repetition, alternation, groups; no look-around or back-references (a clear error).

    >>> import torch, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(4), torch.zeros(4, 4), eos_id=0, token_strings=["", "a", "b", "ab"])
    >>> ppl_lm.rewards.regex_mask(lm, "(ab)+").check(torch.tensor([[3, 1, 2], [1, 2, 1], [3, 0, 0]])).tolist()
    [True, False, True]
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"regex_mask needs a non-empty pattern string, got {pattern!r}")
    return GrammarMask(lm, _OPTIONS + "start: " + _lark_regex(pattern), f"regex {pattern!r}")


def grammar_mask(lm, lark: str) -> GrammarMask:
    """Token mask: the decoded text is a sentence of the Lark grammar ``lark`` (rule ``start``).

    llguidance's Lark dialect: Earley parsing, regex terminals ``/.../``, ``%ignore``, and
    ``%json {schema}`` as a nonterminal.
    """
    if not isinstance(lark, str) or "start" not in lark:
        raise ValueError("grammar_mask needs Lark grammar text with a 'start' rule")
    return GrammarMask(lm, _OPTIONS + lark, "Lark grammar")


def json_mask(lm, schema: dict | str, whitespace: bool = False) -> GrammarMask:
    """Token mask: the decoded text is a JSON value valid under ``schema`` (JSON Schema).

    Args:
        whitespace: allow any JSON whitespace between tokens; by default the layout is fixed
            (``", "`` between items, ``": "`` after keys, nothing else), so one object has one
            text and the LM's mass is not spread over layouts.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise ValueError(f"json_mask: the schema is not valid JSON ({err})") from None
    if not isinstance(schema, dict):
        raise TypeError(f"json_mask needs a JSON Schema object (a dict), got {type(schema).__name__}")
    layout = {"whitespace_flexible": True} if whitespace else {
        "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    schema = {**schema, "x-guidance": {**layout, **schema.get("x-guidance", {})}}
    return GrammarMask(lm, _OPTIONS + "start: %json " + json.dumps(schema), "JSON schema")
