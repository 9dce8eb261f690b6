"""Load the paper's tokenizers: from the Hugging Face cache when present, else rebuilt offline.

X-Token's models (Table 1 of the paper) use three tokenizer families:

    meta-llama/Llama-3.2-1B, -3B   byte-level BPE, 128,000 ranks + 256 specials, digits packed by 1-3
    Qwen/Qwen3-4B                  byte-level BPE, 151,643 ranks + 26 added tokens, NFC, digits split one by one
    microsoft/Phi-4-mini-instruct  o200k_base, 199,998 ranks + specials, digits packed by 1-3

The Hub is unreachable on many machines (this package's CI included), so for these names
`load_tokenizer` rebuilds the *exact* fast tokenizer from BPE ranks that ship inside the PyPI
package `quicktok-v1` (ids byte-identical to the reference tokenizers): the same ranks, the same
pre-tokenizer regex, normalizer, special tokens with their real ids, and BOS behaviour. The
rebuilt tokenizer is an ordinary `transformers.PreTrainedTokenizerFast`; it is cached as
`tokenizer.json` under ``$XTOKEN_CACHE`` (default ``~/.cache/xtoken``) so later loads take <1 s
(one file per family, keyed by a hash of the spec and library versions; see `_prune_cache`).
tests/test_tokenizers.py pins its ids to fixtures produced from independent sources.

Any other name or a local directory goes through `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["load_tokenizer", "PAPER_TOKENIZERS", "TokenizerNotFound", "tokenizer_fingerprint"]


class TokenizerNotFound(RuntimeError):
    """Raised when a tokenizer cannot be found locally and the Hub cannot be reached, or when a local
    folder holds no loadable tokenizer."""


# Pre-tokenizer patterns, as published with each tokenizer.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (  # Qwen2/2.5/3: identical to Llama-3 except \p{N} (one digit per pre-token)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


def _llama32_specials() -> dict[int, str]:
    named = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128002: "<|reserved_special_token_0|>",
        128003: "<|reserved_special_token_1|>",
        128004: "<|finetune_right_pad_id|>",
        128005: "<|step_id|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128010: "<|python_tag|>",
    }
    named.update({128011 + i: f"<|reserved_special_token_{2 + i}|>" for i in range(128256 - 128011)})
    return named


_QWEN3_ADDED = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
# Qwen3 registers the tool/think tags as added tokens with special=False (they survive decode).
_QWEN3_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}

# Phi-4-mini-instruct = o200k_base (<|endoftext|> 199999, <|endofprompt|> 200018) plus its chat
# markers at 200019.. as listed in the model's tokenizer_config.json. The two o200k specials are
# checked against quicktok's o200k data in the tests; the chat-marker ids come from the model card
# and cannot be verified offline here.
_PHI4_SPECIALS = {
    199999: "<|endoftext|>",
    200018: "<|endofprompt|>",
    200019: "<|assistant|>",
    200020: "<|end|>",
    200021: "<|user|>",
    200022: "<|system|>",
    200023: "<|tool|>",
    200024: "<|/tool|>",
    200025: "<|tool_call|>",
    200026: "<|/tool_call|>",
    200027: "<|tool_response|>",
    200028: "<|tag|>",
}


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild one family's fast tokenizer from its BPE ranks."""

    family: str  # "llama3" | "qwen3" | "o200k"
    encoding: str  # quicktok encoding holding the ranks
    pattern: str
    nfc: bool
    specials: dict = field(default_factory=dict)  # id -> content
    not_special: frozenset = frozenset()
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    add_bos: bool = False
    chat_markers: tuple = ()  # role markers, used to map special tokens across families
    model_vocab_size: int = 0  # rows of the model's embedding / logits (padding included)


LLAMA32 = TokenizerSpec(
    family="llama3",
    encoding="llama3",
    pattern=LLAMA3_PATTERN,
    nfc=False,
    specials=_llama32_specials(),
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    pad=None,
    add_bos=True,
    chat_markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    model_vocab_size=128256,
)
QWEN3 = TokenizerSpec(
    family="qwen3",
    encoding="qwen3",
    pattern=QWEN2_PATTERN,
    nfc=True,
    specials={151643 + i: s for i, s in enumerate(_QWEN3_ADDED)},
    not_special=frozenset(_QWEN3_NOT_SPECIAL),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    add_bos=False,
    chat_markers=("<|im_start|>", "<|im_end|>"),
    model_vocab_size=151936,
)
PHI4_MINI = TokenizerSpec(
    family="o200k",
    encoding="o200k_base",
    pattern=O200K_PATTERN,
    nfc=False,
    specials=_PHI4_SPECIALS,
    bos="<|endoftext|>",
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    add_bos=False,
    chat_markers=("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
    model_vocab_size=200064,
)

PAPER_TOKENIZERS: dict[str, TokenizerSpec] = {
    "meta-llama/Llama-3.2-1B": LLAMA32,
    "meta-llama/Llama-3.2-3B": LLAMA32,
    "Qwen/Qwen3-4B": QWEN3,
    "microsoft/Phi-4-mini-instruct": PHI4_MINI,
}
# short aliases accepted by load_tokenizer and the CLI
ALIASES = {
    "llama-3.2": "meta-llama/Llama-3.2-1B",
    "llama": "meta-llama/Llama-3.2-1B",
    "qwen3": "Qwen/Qwen3-4B",
    "qwen": "Qwen/Qwen3-4B",
    "phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "phi": "microsoft/Phi-4-mini-instruct",
}


def _cache_dir() -> Path:
    return Path(os.environ.get("XTOKEN_CACHE", Path.home() / ".cache" / "xtoken")) / "tokenizers"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _rebuild_tokenizer_json(spec: TokenizerSpec) -> str:
    """Build a `tokenizers` JSON for a byte-level BPE from its ranks (rank == id)."""
    import quicktok
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    enc = quicktok.get_encoding(spec.encoding)
    specials = set(spec.specials)
    ranks: dict[bytes, int] = {}
    for i in range(enc.n_vocab):
        if i in specials:
            continue
        try:
            b = enc.decode_single_token_bytes(i)
        except Exception:  # holes in the id space (o200k has unused ids between its specials)
            continue
        if b and i not in specials:
            ranks[b] = i
    b2u = _bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731

    # A merge (a, b) -> a+b gets the priority of a+b's rank: BPE on ranks (tiktoken) merges the
    # adjacent pair whose concatenation has the lowest rank, which is what this list encodes.
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in ranks and b in ranks:
                merges.append((rank, ranks[a], ranks[b], a, b))
    merges.sort()
    vocab = {to_str(t): r for t, r in ranks.items()}
    # Specials go into the model vocabulary at their real ids, so `add_tokens` below reuses those
    # ids instead of numbering consecutively (o200k leaves 199998 and 200000-200017 unused).
    vocab.update({content: i for i, content in spec.specials.items()})
    tk = Tokenizer(
        BPE(vocab=vocab, merges=[(to_str(a), to_str(b)) for *_, a, b in merges], fuse_unk=False, ignore_merges=True)
    )
    if spec.nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens(
        [
            AddedToken(spec.specials[i], special=spec.specials[i] not in spec.not_special, normalized=False)
            for i in sorted(spec.specials)
        ]
    )
    # check that the real ids came out
    for i, content in spec.specials.items():
        got = tk.token_to_id(content)
        if got != i:  # pragma: no cover - guards the id layout above
            raise AssertionError(f"{content} got id {got}, expected {i}")
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec.add_bos:
        bos_id = tk.token_to_id(spec.bos)
        template = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos}:1 $B:1", special_tokens=[(spec.bos, bos_id)]
        )
        tk.post_processor = processors.Sequence([byte_level, template])
    else:
        tk.post_processor = byte_level
    return tk.to_str()


# Bump when the rebuild itself changes in a way that alters tokenizer.json for the same spec.
_CACHE_FORMAT = 1
_STALE_TMP_SECONDS = 3600  # a builder's temporary file older than this was left by a killed process


def _cache_key(spec: TokenizerSpec) -> str:
    """A hash of everything the rebuilt tokenizer.json depends on, identical in every process.

    Built from a canonical JSON of the spec (sets sorted, dicts as sorted pairs), never from a repr:
    a frozenset's repr follows string hashing, which changes with PYTHONHASHSEED."""
    import quicktok
    import tokenizers

    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    fields["specials"] = sorted(spec.specials.items())
    fields["not_special"] = sorted(spec.not_special)
    blob = json.dumps(
        {
            "spec": fields,
            "quicktok": quicktok.__version__,
            "tokenizers": tokenizers.__version__,
            "format": _CACHE_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _prune_cache(keep: Path, family: str) -> None:
    """Remove the family's other cache entries once `keep` is written.

    The cache holds one entry per family (about 8 MB each) rather than a size cap: an entry is a pure
    function of the spec and the library versions in its key, so with this code installed no other key
    of the family can ever be read again; an older entry is only the leftover of a previous version
    (or of a key that used to change from process to process). Two environments with different
    library versions sharing one cache would each rebuild in turn (a few seconds), never grow it.
    Temporary files of killed builders go too, once they are an hour old (a live builder's are fresh)."""
    now = time.time()
    for other in keep.parent.glob(f"{family}-*"):
        if other == keep:
            continue
        try:
            if other.suffix == ".json" or now - other.stat().st_mtime > _STALE_TMP_SECONDS:
                other.unlink()
        except OSError:  # removed meanwhile by a concurrent loader, or not ours to remove
            pass


def _write_cache_entry(path: Path, spec: TokenizerSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(_rebuild_tokenizer_json(spec))
    tmp.replace(path)  # atomic: concurrent loaders never read a half-written file
    _prune_cache(path, spec.family)


def _rebuild(name: str, spec: TokenizerSpec) -> PreTrainedTokenizerFast:
    path = _cache_dir() / f"{spec.family}-{_cache_key(spec)}.json"
    if not path.exists():
        _write_cache_entry(path, spec)
    kwargs = dict(
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), **kwargs)
    except Exception:
        if path.exists():
            raise
        _write_cache_entry(path, spec)  # pruned by another process between the check and the read
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), **kwargs)
    tok.name_or_path = name
    tok.init_kwargs["xtoken_source"] = "offline-rebuild"
    return tok


def resolve_name(name_or_path: str) -> str:
    return ALIASES.get(str(name_or_path).lower(), str(name_or_path))


def load_tokenizer(name_or_path: str, *, source: str = "auto") -> PreTrainedTokenizerFast:
    """Return a Hugging Face fast tokenizer.

    source:
      "auto"    (default) a local directory or the local HF cache if it holds the tokenizer,
                else, for the paper's four models, the exact offline rebuild; no network is
                touched unless the name is unknown, in which case the Hub is tried.
      "offline" never touch the network (paper models are rebuilt, others must be cached).
      "hub"     always go through `AutoTokenizer.from_pretrained` (the Hub or its cache).
    """
    if source not in {"auto", "offline", "hub"}:
        raise ValueError(f"source must be 'auto', 'offline' or 'hub', not {source!r}")
    name = resolve_name(name_or_path)
    if source != "hub" and Path(name).is_dir():
        return _load_directory(Path(name))
    spec = PAPER_TOKENIZERS.get(name)
    if source != "hub":
        try:  # the local HF cache, if this model's tokenizer was ever downloaded here
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            pass
        if spec is not None:
            return _rebuild(name, spec)
        if source == "offline" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise TokenizerNotFound(_not_found_message(name, offline=True))
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise TokenizerNotFound(_not_found_message(name, offline=False, err=err)) from None


# files `save_pretrained` writes for one kind of tokenizer or another; a folder with none of them holds none
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)


def _load_directory(folder: Path) -> PreTrainedTokenizerFast:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerNotFound(
            f"no tokenizer files in {folder} (looked for {', '.join(TOKENIZER_FILES[:2])}, ...): pass the folder "
            f"a tokenizer's save_pretrained() wrote, or a model name such as {next(iter(PAPER_TOKENIZERS))}"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise TokenizerNotFound(
            f"could not load a tokenizer from {folder}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from err


def _not_found_message(name: str, offline: bool, err: Exception | None = None) -> str:
    why = (
        "offline mode is on"
        if offline
        else f"the Hugging Face Hub could not be reached or has no such repo ({type(err).__name__}: {str(err)[:200]})"
    )
    return (
        f"No tokenizer {name!r}: it is not a local directory, not in the local Hugging Face cache, "
        f"and {why}.\n"
        f"  - pass a local directory that holds tokenizer.json / tokenizer_config.json, or\n"
        f"  - download it once where the Hub is reachable (`huggingface-cli download {name}`), or\n"
        f"  - use one of the tokenizers rebuilt offline: {', '.join(PAPER_TOKENIZERS)} "
        f"(aliases: {', '.join(ALIASES)})."
    )


def tokenizer_fingerprint(tok) -> str:
    """A short hash of a tokenizer's id -> token table (what W's rows and columns mean).

    Memoized on the tokenizer object (tokenizers are treated as immutable once loaded)."""
    cached = getattr(tok, "_xtoken_fingerprint", None)
    if cached is not None:
        return cached
    by_id = sorted((i, token) for token, i in tok.get_vocab().items())
    digest = hashlib.sha256("\n".join(f"{i}\t{t}" for i, t in by_id).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    try:
        tok._xtoken_fingerprint = digest
    except AttributeError:  # pragma: no cover
        pass
    return digest


def model_vocab_size(tok) -> int:
    """Rows of the model's logits for this tokenizer (padding beyond the tokenizer included)."""
    spec = PAPER_TOKENIZERS.get(getattr(tok, "name_or_path", ""))
    return max(spec.model_vocab_size if spec else 0, len(tok))
