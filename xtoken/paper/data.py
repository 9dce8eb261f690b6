"""Loading for the paper scale: models, tokenizers and W by hub id or local folder, with one clear message for
what is missing; the pre-training text stream, packed into consecutive ``max_length``-token samples."""

from __future__ import annotations

import os
from pathlib import Path

from .config import PAPER


class HubUnavailable(RuntimeError):
    """A paper-scale model or dataset could not be loaded (no Hub, no cache, or no access)."""


def fetch_hint(name: str, kind: str = "model") -> str:
    """The commands that put ``name`` into the local Hugging Face cache (huggingface_hub's ``hf`` CLI)."""
    repo = " --repo-type dataset" if kind == "dataset" else ""
    gated = (
        f"\n  - {name} is gated: accept its licence on https://huggingface.co/{name} first"
        if name.startswith("meta-llama/")
        else ""
    )
    return (
        f"  - `hf auth login` (a token with read access){gated}\n"
        f"  - `hf download {name}{repo}` on a machine with network (or run there directly)"
    )


def _hint(what: str, err: Exception, kind: str = "model") -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    first_line = str(err).splitlines()[0][:200] if str(err) else ""
    offline_note = "Offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1) and it is not in the local cache. "
    return (
        f"Could not load {kind} {what!r} ({type(err).__name__}: {first_line}).\n"
        f"  {offline_note if offline else ''}"
        f"The paper scale needs it from the Hugging Face Hub or a local cache:\n{fetch_hint(what, kind)}\n"
        f"  The default `scale='mini'` runs offline; `make paper-smoke` runs this path on stand-ins."
    )


def _local_or_hub(name: str) -> str:
    """``name`` unchanged; a path-like name that does not exist is refused with 'no such folder'."""
    p = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not p.exists():
        raise FileNotFoundError(f"no such folder: {name}")
    return str(p) if p.exists() else name


def load_causal_lm(name: str, *, dtype="bfloat16", device_map=None):
    """AutoModelForCausalLM by hub id or local folder. ``device_map={"": device}`` loads the weights straight
    onto that device (no full copy in host memory first). Clear error when it cannot be found."""
    import torch
    from transformers import AutoModelForCausalLM

    name = _local_or_hub(name)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), device_map=device_map)
    except Exception as err:  # hub errors come in many types; the message is what matters
        raise HubUnavailable(_hint(name, err)) from None


def logit_width(name: str) -> int:
    """The model's logit width (``config.vocab_size``) read from its config alone, before any weight loads."""
    from transformers import AutoConfig

    name = _local_or_hub(name)
    try:
        return int(AutoConfig.from_pretrained(name).vocab_size)
    except Exception as err:
        raise HubUnavailable(_hint(name, err)) from None


def load_paper_tokenizer(name: str):
    """The checkpoint's own tokenizer (local folder, or the Hub / its cache); a pad token is set if missing."""
    from ..tokenizers import load_tokenizer

    tok = load_tokenizer(_local_or_hub(name))
    if tok.pad_token is None:
        pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in tok.get_vocab() else tok.eos_token
        tok.pad_token = pad
    return tok


_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def load_text_stream(source: str, *, subset: str | None = None, split: str = "train", text_column: str = "text"):
    """A streamed `datasets.IterableDataset` of the texts: a hub dataset id, or a local file / folder of
    .jsonl, .json, .parquet or .txt files (one shard per file, so N processes read disjoint files)."""
    rows = _stream_rows(source, subset=subset, split=split)
    if rows.column_names is not None and text_column not in rows.column_names:
        raise KeyError(f"{source} has no column {text_column!r} (columns: {rows.column_names}); set text_column")
    return rows


def load_prompt_stream(
    source: str,
    *,
    subset: str | None = None,
    split: str = "train",
    prompt_format: str = "Question: {question}\nAnswer:",
    completion_format: str = " {answer}",
):
    """A streamed dataset of ``{"prompt", "completion"}`` rows (what `DistillCollator` trains on off-policy as
    one text, and an on-policy batch continues from its prompt), each rendered from a row of ``source`` (as in
    `load_text_stream`) by the str.format templates. A template's column missing from the data is refused."""
    from .config import format_columns

    rows = _stream_rows(source, subset=subset, split=split)
    wanted = format_columns(prompt_format) + format_columns(completion_format)
    if rows.column_names is not None:
        missing = sorted(set(wanted) - set(rows.column_names))
        if missing:
            raise KeyError(
                f"{source} has no column(s) {missing} that prompt_format / completion_format read "
                f"(columns: {rows.column_names}); set PaperConfig.prompt_format and completion_format"
            )

    def render(row):
        return {"prompt": prompt_format.format(**row), "completion": completion_format.format(**row)}

    return rows.map(render, remove_columns=rows.column_names)


def _stream_rows(source: str, *, subset: str | None, split: str):
    from datasets import load_dataset

    p = Path(source).expanduser()
    if p.exists() or source.startswith(("/", "./", "../", "~")):
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {source}")
        files = sorted(f for f in ([p] if p.is_file() else p.rglob("*")) if f.suffix in _DATA_FORMATS)
        if not files:
            raise FileNotFoundError(f"{source} holds no {', '.join(_DATA_FORMATS)} files")
        kinds = {_DATA_FORMATS[f.suffix] for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{source} mixes file formats {sorted(kinds)}: keep one per folder")
        return load_dataset(kinds.pop(), data_files={split: [str(f) for f in files]}, split=split, streaming=True)
    try:
        return load_dataset(source, subset, split=split, streaming=True)
    except Exception as err:
        raise HubUnavailable(_hint(source, err, kind="dataset")) from None


def pack_texts(texts, tokenizer, max_length: int, separator: str = "\n\n", block_chars: int | None = None):
    """Cut a stream of documents into consecutive training samples of ``max_length`` student tokens.

    The documents are joined with ``separator`` and tokenized in blocks (with offsets); each sample is the
    exact text of ``max_length - 1`` consecutive tokens (the collator adds the BOS), so nothing is thrown
    away, and every teacher later sees the same characters (the collator cuts all sides at one character).
    A block's last token may be a word cut by the block's end: it is never put in a sample but re-read at
    the start of the next block. Yields ``{"text": str}``.
    """
    n = max(1, max_length - (1 if tokenizer.bos_token_id is not None else 0))
    block_chars = block_chars or 16 * n * 4
    buf = ""
    for doc in texts:
        buf = f"{buf}{separator}{doc}" if buf else doc
        while len(buf) >= block_chars:
            buf = yield from _emit(buf, tokenizer, n, final=False)
    if buf:
        yield from _emit(buf, tokenizer, n, final=True)


def _emit(text: str, tokenizer, n: int, final: bool):
    """Yield the complete n-token samples of ``text``; return the text left for the next block."""
    offs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)[
        "offset_mapping"
    ]
    usable = len(offs) if final else len(offs) - 1  # the last token may continue in the next block
    start = 0
    while start + n <= usable:
        a, b = offs[start][0], offs[start + n - 1][1]
        yield {"text": text[a:b]}
        start += n
    if final:
        return ""
    return text[offs[start][0] :] if start < len(offs) else ""


def packed_stream(rows, tokenizer, max_length: int, *, text_column: str = "text", separator: str = "\n\n"):
    """`pack_texts` over a streamed dataset, as a `datasets.IterableDataset` with one shard per source shard,
    so that accelerate gives each process its own source shards (when there are at least as many)."""
    from datasets import IterableDataset

    def gen(shards):
        for i in shards:
            part = rows.shard(num_shards=rows.n_shards, index=i)
            yield from pack_texts((r[text_column] for r in part), tokenizer, max_length, separator)

    return IterableDataset.from_generator(gen, gen_kwargs={"shards": list(range(rows.n_shards))})


def stream_pretraining_text(
    name: str = PAPER["dataset"], subset: str | None = None, split: str = "train", text_column: str = "text"
):
    """The raw text stream (`load_text_stream`), kept under its earlier name."""
    return load_text_stream(name, subset=subset, split=split, text_column=text_column)


def projection_for(student_tok, teacher_tok, teacher_width: int, cache_dir, path: str | None = None):
    """W for a tokenizer pair with ``teacher_width`` columns (the teacher model's logit width, whatever the
    tokenizer's own length). ``path``: a given W file, checked against the tokenizers. Otherwise built once
    and cached in ``cache_dir`` under the tokenizers' fingerprints (bit-identical on every rebuild)."""
    from ..projection import Projection, build_projection
    from ..tokenizers import tokenizer_fingerprint

    if path is not None:
        W = Projection.load(path, student_tok, teacher_tok)
        return W if W.teacher_vocab_size == teacher_width else W.with_teacher_width(teacher_width)
    f = Path(cache_dir) / (
        f"{tokenizer_fingerprint(student_tok)}-{tokenizer_fingerprint(teacher_tok)}-{teacher_width}.safetensors"
    )
    if f.exists():
        return Projection.load(f, student_tok, teacher_tok)
    W = build_projection(student_tok, teacher_tok, teacher_vocab_size=teacher_width)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    W.save(tmp)
    os.replace(tmp, f)
    return W


def _in_hub_cache(repo: str, kind: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    name = "config.json" if kind == "model" else "README.md"
    hit = try_to_load_from_cache(repo, name, repo_type=kind)
    if isinstance(hit, str):
        return True
    from huggingface_hub.constants import HF_HUB_CACHE

    return kind == "dataset" and (Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}").exists()
