"""Diagnostics of the mechanism (the paper's Proposition 1) and of a learned W:

numeral_mass          the student's probability mass on multi-digit numeral tokens at positions whose next
                      token is a numeral, on a fixed probe batch (logged during training by NumeralMassCallback)
digit_split_fraction  the fraction of multi-digit numbers the student generates digit by digit
learned_w_summary     how far a learned W's rows moved"""

from __future__ import annotations

import torch

from .config import MiniConfig
from .corpus import load_corpus


def _probe(out_dir, cfg: MiniConfig, n: int = 64) -> list[str]:
    """A fixed probe batch: the first ``n`` arithmetic test texts (full solutions)."""
    test = load_corpus(out_dir)["test"]
    return [t for t, s in zip(test["text"], test["skill"]) if s == "arithmetic"][:n]


@torch.no_grad()
def numeral_mass(model, tok, texts, vocab_size=None) -> float:
    """Mean student probability mass on multi-digit numeral tokens at positions whose next token is a
    numeral (Proposition 1: GOLD pushes this towards 0 when multi-digit numerals are uncommon)."""
    v = vocab_size or model.get_output_embeddings().weight.shape[0]
    strings = [tok.decode([i]) for i in range(v)]
    is_num = torch.tensor([s.strip().isdigit() for s in strings])
    is_multi = torch.tensor([s.strip().isdigit() and len(s.strip()) >= 2 for s in strings])
    enc = tok(texts, return_tensors="pt", padding=True)
    was = model.training
    model.eval()
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, :-1]
    model.train(was)
    nxt = enc.input_ids[:, 1:]
    pos = is_num[nxt.clamp(max=v - 1)] & (enc.attention_mask[:, 1:] == 1)
    p = torch.softmax(logits.float(), -1)
    mass = (p * is_multi.to(p.dtype)).sum(-1)
    return float(mass[pos].mean()) if pos.any() else float("nan")


@torch.no_grad()
def digit_split_fraction(model, tok, prompts, max_new_tokens=32, batch=32) -> dict:
    """Generate greedily for ``prompts``; among generated numbers with >= 2 digits, the fraction
    written with more than one token, i.e. digit by digit (e.g. '3','4','7') -> ``digit_split``;
    among all generated numbers, the fraction with a single digit -> ``single_digit`` (a student that
    lost its multi-digit tokens may also just write one digit where a number belongs)."""
    v = model.get_output_embeddings().weight.shape[0]
    strings = [tok.decode([i]) for i in range(v)]
    digits = [s.strip() if s.strip().isdigit() and s == s.strip() else None for s in strings]
    side = tok.padding_side
    tok.padding_side = "left"
    split = total = numbers = single = 0
    model.eval()
    try:
        for a in range(0, len(prompts), batch):
            enc = tok(prompts[a : a + batch], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for row in out[:, enc.input_ids.shape[1] :].tolist():
                run = []
                for i in row + [-1]:
                    d = digits[i] if 0 <= i < v else None
                    if d is not None:
                        run.append(d)
                        continue
                    if run:
                        numbers += 1
                        single += len("".join(run)) == 1
                    if run and len("".join(run)) >= 2:
                        total += 1
                        split += len(run) > 1
                    run = []
    finally:
        tok.padding_side = side
    return {
        "digit_split": split / total if total else float("nan"),
        "numbers": total,
        "single_digit": single / numbers if numbers else float("nan"),
        "all_numbers": numbers,
    }


def NumeralMassCallback(tok, texts, every: int):
    """A TrainerCallback logging `numeral_mass` every ``every`` steps into ``self.history``."""
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def __init__(self):
            self.history = []

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0 or state.global_step == 1:
                self.history.append((state.global_step, numeral_mass(model, tok, texts)))

    return _CB()


def learned_w_summary(lp, student_vocab, teacher_vocab, n: int = 12) -> dict:
    """How far a learned W moved: mean/max L1 change over its trainable rows, the share of numeral rows
    among them, and the ``n`` rows that moved most as readable strings (student token -> teacher tokens,
    weights before -> after)."""
    import numpy as np

    dist = lp.row_changes()
    s_str = lambda i: student_vocab.tok.convert_ids_to_tokens(int(i))
    t_str = lambda i: teacher_vocab.tok.convert_ids_to_tokens(int(i))
    is_num = np.array([s_str(r).lstrip("Ġ").isdigit() for r in lp.rows.tolist()], dtype=bool)
    top = []
    for m in lp.moved_rows(n):
        top.append(
            {
                "student": s_str(m["row"]),
                "teacher": [t_str(t) for t in m["teacher_ids"]],
                "before": [round(x, 4) for x in m["before"]],
                "after": [round(x, 4) for x in m["after"]],
                "l1_change": round(m["l1_change"], 4),
            }
        )
    d = dist.numpy()
    return {
        "trainable_rows": int(len(d)),
        "numeral_rows": int(is_num.sum()),
        "mean_l1_change": float(d.mean()) if len(d) else 0.0,
        "max_l1_change": float(d.max()) if len(d) else 0.0,
        "mean_l1_change_numerals": float(d[is_num].mean()) if is_num.any() else 0.0,
        "mean_l1_change_other": float(d[~is_num].mean()) if (~is_num).any() else 0.0,
        "top_moved": top,
    }
