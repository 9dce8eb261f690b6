"""The canonical form of a token: its raw bytes, or its role if it is a special token.

W's first pass (the paper's "exact match after canonicalization") compares tokens across
families whose vocabularies spell the same bytes differently:

    byte-level BPE (Llama-3, Qwen3, o200k)    'Ġthe' = b' the', 'ĉ' = b'\\t', 'Ċ' = b'\\n'
    SentencePiece with byte fallback          '▁the' = b' the', '<0x09>' = b'\\t'

Working on bytes rather than decoded text means a token that is a partial UTF-8 sequence
(the first two bytes of a CJK character, say) matches the teacher token holding the same two
bytes, instead of both decoding to U+FFFD. The public implementation's defects are avoided by
construction: an ASCII '_' is the byte 0x5F and never a space; 'ĉ' is 0x09 (TAB), not a
newline; spaces before punctuation are bytes like any other; no text-repair tables.

Special tokens have no bytes; they match by role (bos, end_of_text, end_of_turn, ...).
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["token_bytes", "special_roles", "vocab_kind"]

# Known special-token contents across the families this package ships, by role.
KNOWN_ROLES = {
    "<|begin_of_text|>": "bos",
    "<s>": "bos",
    "<bos>": "bos",
    "<|end_of_text|>": "end_of_text",
    "<|endoftext|>": "end_of_text",
    "</s>": "end_of_text",
    "<eos>": "end_of_text",
    "<|eot_id|>": "end_of_turn",
    "<|im_end|>": "end_of_turn",
    "<|end|>": "end_of_turn",
    "<end_of_turn>": "end_of_turn",
    "<|start_header_id|>": "start_of_turn",
    "<|im_start|>": "start_of_turn",
    "<start_of_turn>": "start_of_turn",
    "<|finetune_right_pad_id|>": "pad",
    "<pad>": "pad",
    "<|pad|>": "pad",
    "<unk>": "unk",
    "<|fim_prefix|>": "fim_prefix",
    "<|fim_middle|>": "fim_middle",
    "<|fim_suffix|>": "fim_suffix",
    "<|python_tag|>": "tool_call",
    "<|tool_call|>": "tool_call",
}

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from .tokenizers import _bytes_to_unicode

    return {c: b for b, c in _bytes_to_unicode().items()}


def _component_json(component) -> str:
    return component.__getstate__().decode() if component is not None else ""


def vocab_kind(tok) -> str:
    """'byte_level' (GPT-2 byte map), 'sentencepiece' ('▁' spaces, <0xHH> bytes) or 'text'."""
    backend = tok.backend_tokenizer
    dec = _component_json(backend.decoder) + _component_json(backend.pre_tokenizer)
    if "ByteLevel" in dec:
        return "byte_level"
    if "Metaspace" in dec or "ByteFallback" in dec or "\u2581" in dec:
        return "sentencepiece"
    return "text"


def _special_ids(tok) -> set[int]:
    ids = set(tok.all_special_ids)
    for i, added in tok.added_tokens_decoder.items():
        if added.special:
            ids.add(i)
    return ids


def token_bytes(tok) -> list[bytes | None]:
    """Raw bytes of every id; None for special tokens and for unused ids (holes).

    The list is indexed by id and has ``max_id + 1`` entries. Memoized on the tokenizer object
    (tokenizers are treated as immutable once loaded).
    """
    cached = getattr(tok, "_xtoken_token_bytes", None)
    if cached is not None:
        return cached
    out = _token_bytes(tok)
    try:
        tok._xtoken_token_bytes = out
    except AttributeError:  # pragma: no cover - exotic tokenizer classes
        pass
    return out


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, int]:
    """str.translate table: GPT-2 byte-map character -> the latin-1 character of its byte."""
    return {ord(c): b for c, b in _byte_decoder().items()}


def _token_bytes(tok) -> list[bytes | None]:
    vocab = tok.get_vocab()
    size = max(vocab.values()) + 1
    out: list[bytes | None] = [None] * size
    specials = _special_ids(tok)
    kind = vocab_kind(tok)
    added = {i: a.content for i, a in tok.added_tokens_decoder.items()}
    table = _byte_level_table()
    for piece, i in vocab.items():
        if i in specials:
            continue
        if i in added:  # added, non-special tokens (Qwen's <think>): literal text
            out[i] = added[i].encode("utf-8")
        elif kind == "byte_level":
            mapped = piece.translate(table)
            try:
                out[i] = mapped.encode("latin-1")
            except UnicodeEncodeError:  # a non-byte-map entry (rare): take it as text
                out[i] = piece.encode("utf-8")
        elif kind == "sentencepiece":
            m = _BYTE_FALLBACK.match(piece)
            out[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
        else:
            out[i] = tok.convert_tokens_to_string([piece]).encode("utf-8")
    return out


def special_roles(tok) -> dict[int, str]:
    """Role of every special token: from the known table, else from the tokenizer's attributes,
    else the token's own content (so identical specials in two families still match)."""
    attr_roles = {}
    for attr, role in (("bos_token", "bos"), ("eos_token", "end_of_text"), ("pad_token", "pad"), ("unk_token", "unk")):
        content = getattr(tok, attr, None)
        if content is not None:
            attr_roles.setdefault(str(content), role)
    roles = {}
    for i in sorted(_special_ids(tok)):
        content = tok.convert_ids_to_tokens(i)
        roles[i] = KNOWN_ROLES.get(content) or attr_roles.get(content) or f"literal:{content}"
    return roles
