"""Tiny models of the paper's real families, over restricted (renumbered) vocabularies.

A miniature cannot afford a 128k-row output layer (it dominates the step time at toy scale), so
each model's vocabulary is the set of ids the corpus can produce. Rather than
keep a side mapping in custom code, `restrict_tokenizer` renumbers a real HF fast tokenizer so the
kept ids become 0..n-1 (everything else n..V-1, never produced by the corpus): it tokenizes any text
exactly like the original, only the numbers differ, and ``local_to_full`` maps back. A model with
``vocab_size = n`` plus that tokenizer is an ordinary HF model directory that
`AutoModelForCausalLM.from_pretrained` and lm-eval load with no custom code.

W for a pair is always built on the full ids and then restricted::

    build_projection(student_tok, teacher_tok).restrict(student_local_to_full, teacher_local_to_full,
                                                        student_tok=student_local_tok, teacher_tok=teacher_local_tok)

so the restricted W records the local tokenizers' fingerprints (checked by the trainer and the losses).

Families (the paper's models -> the HF class used here):
    student   Llama-3.2-1B        LlamaForCausalLM  (the weakest: smallest size)
    llama     Llama-3.2-3B        LlamaForCausalLM  (same tokenizer as the student)
    qwen3     Qwen3-4B            Qwen3ForCausalLM  (digits split one by one)
    phi       Phi-4-mini-instruct Phi3ForCausalLM   (o200k: digits packed by 1-3 like Llama)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = [
    "restrict_tokenizer",
    "keep_ids_for",
    "numeral_strings",
    "build_model",
    "save_model",
    "load_model",
    "LocalVocab",
    "FAMILY_TOKENIZER",
    "VOCAB_FILE",
]

VOCAB_FILE = "xtoken_vocab.json"
FAMILY_TOKENIZER = {"student": "llama", "llama": "llama", "qwen3": "qwen3", "phi": "phi"}


def numeral_strings() -> list[str]:
    """Every number 0..999, with and without a leading space."""
    nums = [str(i) for i in range(1000)]
    return nums + [" " + s for s in nums]


def _special_ids(tok) -> list[int]:
    ids = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
    return sorted(ids)


def keep_ids_for(corpus_texts, tok) -> list[int]:
    """Sorted ids that the corpus texts (and every numeral 0..999, +/- a leading space) tokenize into,
    plus bos / eos / pad."""
    ids: set[int] = set(_special_ids(tok))
    texts = list(corpus_texts) + numeral_strings()
    for row in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.update(row)
    return sorted(ids)


def restrict_tokenizer(tok, keep_ids):
    """Renumber `tok` so ``keep_ids`` (in the order given) become 0..n-1.

    Returns ``(local_tok, local_to_full)``: a `PreTrainedTokenizerFast` that tokenizes every text
    exactly like `tok` with ids ``full_to_local[...]``, and a LongTensor with
    ``local_to_full[local_tok(x).input_ids] == tok(x).input_ids``. Ids outside ``keep_ids`` are
    shifted to n..V-1 (kept in the tokenizer so nothing changes, never produced by the corpus).
    """
    from transformers import PreTrainedTokenizerFast

    keep = [int(i) for i in keep_ids]
    if len(set(keep)) != len(keep):
        raise ValueError("keep_ids has duplicates")
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    all_ids = sorted(set(vocab.values()) | {a["id"] for a in spec.get("added_tokens", [])})
    kept = set(keep)
    missing = kept - set(all_ids)
    if missing:
        raise ValueError(f"keep_ids not in the tokenizer: {sorted(missing)[:5]}")
    order = keep + [i for i in all_ids if i not in kept]
    full_to_local = {f: l for l, f in enumerate(order)}
    spec["model"]["vocab"] = {t: full_to_local[i] for t, i in vocab.items()}
    for a in spec.get("added_tokens", []):
        a["id"] = full_to_local[a["id"]]

    def fix_post(p):
        if not p:
            return
        if p.get("type") == "Sequence":
            for q in p["processors"]:
                fix_post(q)
        if p.get("type") == "TemplateProcessing":
            for v in p["special_tokens"].values():
                v["ids"] = [full_to_local[i] for i in v["ids"]]

    fix_post(spec.get("post_processor"))

    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(spec))
    pad = tok.pad_token if tok.pad_token is not None else tok.eos_token  # Llama has no pad: use eos
    local = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
        model_max_length=tok.model_max_length,
    )
    local.name_or_path = f"{tok.name_or_path}@restricted{len(keep)}"
    local_to_full = torch.tensor(order[: len(keep)], dtype=torch.long)
    return local, local_to_full


class LocalVocab:
    """A family's restricted tokenizer: ``tok`` (local ids), ``local_to_full`` and (lazily) ``full_tok``."""

    def __init__(self, name, full_tok, keep_ids, *, local_tok=None):
        self.name = name
        self._full_tok = full_tok
        if local_tok is None:
            self.tok, self.local_to_full = restrict_tokenizer(full_tok, keep_ids)
        else:
            self.tok, self.local_to_full = local_tok, torch.as_tensor(list(keep_ids), dtype=torch.long)
        self.size = len(self.local_to_full)

    @property
    def full_tok(self):
        if self._full_tok is None:
            from xtoken import load_tokenizer

            self._full_tok = load_tokenizer(self.name)
        return self._full_tok

    def to_json(self) -> dict:
        from xtoken.tokenizers import resolve_name

        return {
            "family_tokenizer": self.name,
            "full_tokenizer": resolve_name(self.name),
            "local_to_full": self.local_to_full.tolist(),
        }

    def save(self, d) -> Path:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(d))
        (d / VOCAB_FILE).write_text(json.dumps(self.to_json()))
        return d

    @classmethod
    def load(cls, d) -> "LocalVocab":
        """Read a saved restricted tokenizer (fast: no re-restriction; the full one loads on demand)."""
        from transformers import AutoTokenizer

        d = Path(d)
        info = json.loads((d / VOCAB_FILE).read_text())
        return cls(
            info["family_tokenizer"], None, info["local_to_full"], local_tok=AutoTokenizer.from_pretrained(str(d))
        )


def build_model(family: str, size, vocab_size: int, tok, *, seed: int = 0, max_positions: int = 512):
    """A freshly initialised tiny model of a family ('student', 'llama', 'qwen3', 'phi')."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    inter = size.intermediate or 2 * size.hidden
    common = dict(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        intermediate_size=inter,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if family in ("student", "llama"):
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif family == "qwen3":
        cfg, cls = Qwen3Config(head_dim=size.hidden // size.heads, **common), Qwen3ForCausalLM
    elif family == "phi":
        cfg, cls = Phi3Config(**common), Phi3ForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    return cls(cfg)


def save_model(model, vocab: LocalVocab, out_dir, extra: dict | None = None) -> Path:
    """Write an HF model directory: weights + config, the local tokenizer, and ``xtoken_vocab.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    vocab.tok.save_pretrained(str(out))
    (out / VOCAB_FILE).write_text(json.dumps(dict(vocab.to_json(), **(extra or {}))))
    return out


def load_model(model_dir):
    """(model, local tokenizer, local_to_full LongTensor, vocab json) from a directory `save_model` wrote."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    info = json.loads((d / VOCAB_FILE).read_text())
    return model, tok, torch.tensor(info["local_to_full"], dtype=torch.long), info
