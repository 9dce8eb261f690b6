"""Per-item scores of one model on the miniature's test split, and the diagnostics built on them.

`score_items` turns one lm-eval call (``log_samples=True``) plus one teacher-forced pass into a tidy frame,
one row per test item:

    skill, item, idx, kind, gold, pred    item: position among the skill's test rows; pred: lm-eval's extracted answer
    exact_match                           lm-eval's strict-match exact match (0/1), the score of the tables
    solution_match                        greedy decoding reproduced the whole gold solution (steps and answer
                                          line), read from lm-eval's own generation (no second decode)
    logp_solution, logp_answer            teacher-forced log-probability (nats) of the whole gold solution and of
                                          its answer line ``#### N`` (given the question and the gold steps)
    n_solution, n_answer                  their token counts

The teacher-forced pass scores exactly the token ids greedy decoding conditions on: the prompt ``question + "\\n"``
tokenized as lm-eval tokenizes it (BOS first), then the solution tokenized on its own. The miniature's
tokenizers put a pre-tokenization boundary after the prompt's newline, so these are the ids of the training
text; `teacher_forced` checks that per item and gives NaN where it does not hold. (lm-eval's own loglikelihood
requests cannot be used: they move the prompt's trailing whitespace into the continuation, which then tokenizes
into ids outside the restricted vocabulary.)

Diagnostics for notebook 03 (where greedy answers go wrong): `error_breakdown`, `w_first_token_groups`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .corpus import ANSWER_MARK, END

__all__ = [
    "solution_of",
    "teacher_forced",
    "samples_table",
    "score_items",
    "error_breakdown",
    "w_first_token_groups",
    "ITEM_COLUMNS",
]

ITEM_COLUMNS = [
    "skill",
    "item",
    "idx",
    "kind",
    "gold",
    "pred",
    "exact_match",
    "solution_match",
    "logp_solution",
    "logp_answer",
    "n_solution",
    "n_answer",
]


def solution_of(text: str, question: str) -> str:
    """The gold solution of a test item: its text after ``question + "\\n"``, without the closing blank line."""
    if not text.startswith(question + "\n"):
        raise ValueError(f"text does not start with its question: {text[:60]!r}")
    sol = text[len(question) + 1 :]
    return sol[: -len(END)] if sol.endswith(END) else sol


@torch.no_grad()
def teacher_forced(model, tok, questions, solutions, batch: int = 256) -> pd.DataFrame:
    """log p(solution | question) and log p(answer line | question, steps) per item, in batches of one forward
    pass each (right padding). Returns columns logp_solution, logp_answer, n_solution, n_answer."""
    prompts = tok([q + "\n" for q in questions])["input_ids"]  # as lm-eval encodes the context
    conts = tok(list(solutions), add_special_tokens=False, return_offsets_mapping=True)
    full = tok([q + "\n" + s for q, s in zip(questions, solutions)])["input_ids"]
    seqs, starts, ans_starts = [], [], []
    for p, c, offs, f, sol in zip(prompts, conts["input_ids"], conts["offset_mapping"], full, solutions):
        if p + c != f:  # not the training text's ids: no teacher-forced score for this item
            seqs.append(None)
            starts.append(0)
            ans_starts.append(0)
            continue
        mark = sol.rfind(ANSWER_MARK.strip())
        k = next((j for j, (a, _) in enumerate(offs) if a >= mark), len(c)) if mark >= 0 else len(c)
        seqs.append(p + c)
        starts.append(len(p))
        ans_starts.append(len(p) + k)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    was = model.training
    model.eval()
    out = {"logp_solution": [], "logp_answer": [], "n_solution": [], "n_answer": []}
    try:
        order = sorted((i for i in range(len(seqs)) if seqs[i] is not None), key=lambda i: len(seqs[i]))
        res = [(float("nan"), float("nan"), 0, 0)] * len(seqs)  # batches of similar lengths
        for a in range(0, len(order), batch):
            idx = order[a : a + batch]
            L = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # log p(token t+1 | tokens <= t)
            for r, i in enumerate(idx):
                n = len(seqs[i])
                lp = tok_lp[r, : n - 1]
                res[i] = (
                    float(lp[starts[i] - 1 :].sum()),
                    float(lp[ans_starts[i] - 1 :].sum()),
                    n - starts[i],
                    n - ans_starts[i],
                )
    finally:
        model.train(was)
    for r in res:
        for k, v in zip(out, r):
            out[k].append(v)
    return pd.DataFrame(out)


def samples_table(raw: dict, skills=("arithmetic", "knowledge"), prefix: str = "xtoken_mini_") -> pd.DataFrame:
    """lm-eval's logged samples (``log_samples=True``) as one row per item: skill, item, idx, kind, gold, pred,
    exact_match, generation and solution_match (the generation, up to the stop sequence, is the gold solution)."""
    rows = []
    for skill in skills:
        for s in sorted(raw["samples"][prefix + skill], key=lambda s: s["doc_id"]):
            doc = s["doc"]
            gen = s["resps"][0][0]
            pred = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            sol = solution_of(doc["text"], doc["question"])
            rows.append(
                {
                    "skill": skill,
                    "item": int(s["doc_id"]),
                    "idx": int(doc["idx"]),
                    "kind": doc["kind"],
                    "gold": str(doc["answer"]),
                    "pred": str(pred),
                    "exact_match": float(s["exact_match"]),
                    "solution_match": float(gen.strip() == sol.strip()),
                    "generation": gen,
                    "question": doc["question"],
                    "solution": sol,
                }
            )
    return pd.DataFrame(rows)


def score_items(lm, raw: dict, batch: int = 256) -> pd.DataFrame:
    """Per-item scores (``ITEM_COLUMNS`` + generation) of the model an lm-eval call ran (``lm``: its HFLM)."""
    items = samples_table(raw)
    tf = teacher_forced(lm.model, lm.tokenizer, list(items.question), list(items.solution), batch=batch)
    items = pd.concat([items.reset_index(drop=True), tf], axis=1)
    return items[ITEM_COLUMNS + ["generation"]]


# ---- diagnostics: where greedy answers go wrong --------------------------------------------------------------


def _first_diff(gold: str, pred: str) -> str:
    """Which digit of a wrong numeral answer differs first: 'hundreds' / 'tens' / 'units' (place value, same
    length), 'length' (a different number of digits) or 'not a number'."""
    if not pred.isdigit():
        return "not a number"
    if len(pred) != len(gold):
        return "length"
    places = {3: ("hundreds", "tens", "units"), 2: ("tens", "units"), 1: ("units",)}[len(gold)]
    return next(p for p, a, b in zip(places, gold, pred) if a != b)


def w_first_token_groups(W, student_tok, teacher_tok=None, numerals=range(1000)) -> dict:
    """{numeral string: the teacher token with W's largest weight in the numeral's student-token row}: numerals
    with the same value form one group that the projected teacher distribution cannot tell apart by its top
    token (with a digit-splitting teacher: the first digit). Numerals that are not one student token are left out."""
    out = {}
    for n in numerals:
        s = str(n)
        ids = student_tok(s, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            continue
        row = W.row(int(ids[0]), teacher_tok=teacher_tok)
        if row:
            out[s] = max(row, key=lambda x: x[2])[0]
    return out


def error_breakdown(items: pd.DataFrame, settings, groups: dict | None = None) -> dict:
    """Where greedy answers of arithmetic items go wrong, per setting (pooled over seeds):

    ``by_kind``   exact match (%) per item kind
    ``by_digit``  share (%) of wrong numeral answers by the first differing digit (or length / not a number)
    ``group``     among wrong answers that are numerals, the share (%) in the gold's W group (same top teacher
                  token, ``groups`` from `w_first_token_groups`), and the share with the gold's first digit
    ``teacher_forced``  mean log p of the gold solution and answer line (nats), exact match and solution match (%)
    """
    ar = items[(items.skill == "arithmetic") & items.setting.isin(list(settings))].copy()
    ar["gold"] = ar.gold.astype(str)
    ar["pred"] = ar.pred.astype(str)
    order = [s for s in settings if s in set(ar.setting)]
    by_kind = (100 * ar.pivot_table(index="kind", columns="setting", values="exact_match", aggfunc="mean"))[order]
    wrong = ar[ar.exact_match == 0].copy()
    wrong["where"] = [_first_diff(g, p) for g, p in zip(wrong.gold, wrong.pred)]
    by_digit = (
        (100 * pd.crosstab(wrong["where"], wrong.setting, normalize="columns"))
        .reindex(["hundreds", "tens", "units", "length", "not a number"])
        .fillna(0)[order]
    )
    num = wrong[wrong.pred.str.isdigit()]
    grp = {}
    for s in order:
        g = num[num.setting == s]
        row = {
            "wrong numeral answers": len(g),
            "same first digit as gold (%)": 100 * float(np.mean([a[0] == b[0] for a, b in zip(g.gold, g.pred)]))
            if len(g)
            else float("nan"),
        }
        if groups:
            inn = [groups.get(a) is not None and groups.get(a) == groups.get(b) for a, b in zip(g.gold, g.pred)]
            row["same W top teacher token as gold (%)"] = 100 * float(np.mean(inn)) if len(g) else float("nan")
        grp[s] = row
    tf = ar.groupby("setting")[["logp_solution", "logp_answer", "exact_match", "solution_match"]].mean().loc[order]
    tf[["exact_match", "solution_match"]] *= 100
    return {"by_kind": by_kind, "by_digit": by_digit, "group": pd.DataFrame(grp)[order], "teacher_forced": tf}
