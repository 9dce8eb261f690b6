"""The coverage audit reproduces the paper's Table 8 with the real vocabularies."""

import numpy as np
import pandas as pd
import pytest

from xtoken.audit import CATEGORIES, coverage_audit, occurrence_audit, token_category
from xtoken.canonical import token_bytes
from xtoken.projection import Projection, ProjectionMismatch, build_projection


@pytest.fixture(scope="module")
def projections(llama, qwen, phi):
    """The full W for Llama -> each teacher, built once for the module."""
    return {"qwen": build_projection(llama, qwen), "phi": build_projection(llama, phi)}


@pytest.fixture(scope="module")
def audits(llama, qwen, phi, projections):
    return {
        "qwen": coverage_audit(llama, qwen, projections["qwen"]),
        "phi": coverage_audit(llama, phi, projections["phi"]),
    }


def _row(audit, cat):
    return audit.table.set_index("category").loc[cat]


def test_table8_numerals(audits):
    q, p = audits["qwen"], audits["phi"]
    assert (_row(q, "numeral_2digit").gold_common, _row(q, "numeral_2digit").student_tokens) == (0, 100)
    assert (_row(q, "numeral_3digit").gold_common, _row(q, "numeral_3digit").student_tokens) == (0, 1000)
    assert (_row(p, "numeral_2digit").gold_common, _row(p, "numeral_2digit").student_tokens) == (100, 100)
    assert (_row(p, "numeral_3digit").gold_common, _row(p, "numeral_3digit").student_tokens) == (1000, 1000)
    # H-KL's widened set takes every numeral back in under Qwen (top-1 = the first digit)
    assert _row(q, "numeral_3digit").hkl_common == 1000


@pytest.mark.parametrize("teacher", ["qwen", "phi"])
def test_punctuation_and_single_digits_complete(audits, teacher):
    for cat, n in (("ascii_punctuation", 32), ("single_digit", 10)):
        r = _row(audits[teacher], cat)
        assert r.student_tokens == n and r.gold_common == n


def test_recommendation_follows_the_paper(audits):
    assert audits["qwen"].recommend()[0] == "P-KL"
    assert "0/100" in audits["qwen"].recommend()[1]
    assert audits["phi"].recommend()[0] == "H-KL"


def test_counts_add_up(audits, llama):
    t = audits["qwen"].table
    assert t.student_tokens.sum() == len(llama)
    assert ((t.gold_common <= t.hkl_common) & (t.hkl_common + t.empty_rows == t.student_tokens)).all()


def test_given_projection_is_used(llama, qwen):
    W = build_projection(llama, qwen, max_span=2)  # 3-digit numerals now have empty rows
    a = coverage_audit(llama, qwen, projection=W)
    assert _row(a, "numeral_3digit").hkl_common == 0 and _row(a, "numeral_3digit").empty_rows == 1000


@pytest.mark.parametrize(
    "raw,cat",
    [
        (b"!", "ascii_punctuation"),
        (b"7", "single_digit"),
        (b"42", "numeral_2digit"),
        (b"201", "numeral_3digit"),
        (b" \n", "whitespace"),
        (b"\xe4\xbd", "multibyte"),
        (None, "special"),
        (b" the", "word"),
        (b"_init", "other"),
    ],
)
def test_token_category(raw, cat):
    assert token_category(raw) == cat


# ---- occurrence_audit: the same counts weighted by token occurrences in a corpus --------------------------------
# Llama: 'The',' adventurer',' paid',' ','347',' coins',',',' then',' ','12',' more','.' and '347',' ','347'
HAND_TEXTS = ["The adventurer paid 347 coins, then 12 more.", "347 347"]
INT_COLUMNS = ["occurrences", "gold_common", "hkl_common", "outside_gold"]


def _counts(audit, cat):
    return tuple(int(v) for v in audit.table.set_index("category").loc[cat, INT_COLUMNS])


def test_occurrences_by_hand_qwen(llama, projections):
    a = occurrence_audit(llama, projections["qwen"], HAND_TEXTS)
    # Qwen3 splits every multi-digit numeral: outside GOLD's C, inside H-KL's (top-1 = the first digit)
    assert _counts(a, "numeral_3digit") == (3, 0, 3, 3)
    assert _counts(a, "numeral_2digit") == (1, 0, 1, 1)
    assert _counts(a, "word") == (6, 6, 6, 0)
    assert _counts(a, "whitespace") == (3, 3, 3, 0)
    assert _counts(a, "all") == (15, 11, 15, 4)
    row = a.table.set_index("category").loc["all"]
    assert row.gold_pct == pytest.approx(73.33) and row.hkl_pct == 100.0
    assert np.isnan(a.table.set_index("category").loc["single_digit", "gold_pct"])  # does not occur
    top = a.top_outside
    assert top[["token", "category", "count", "kind", "top1_teacher"]].values.tolist() == [
        ["347", "numeral_3digit", 3, "multi", "3"],
        ["12", "numeral_2digit", 1, "multi", "1"],
    ]
    assert top.pct.tolist() == [20.0, 6.67]
    assert (a.student, a.teacher) == ("meta-llama/Llama-3.2-1B", "Qwen/Qwen3-4B")


def test_occurrences_by_hand_phi(llama, projections):
    a = occurrence_audit(llama, projections["phi"], HAND_TEXTS, teacher_name="phi")
    # o200k packs numerals like Llama; it splits ' adventurer' into ' advent' + 'urer'
    assert _counts(a, "numeral_3digit") == (3, 3, 3, 0)
    assert _counts(a, "numeral_2digit") == (1, 1, 1, 0)
    assert _counts(a, "word") == (6, 5, 6, 1)
    assert _counts(a, "all") == (15, 14, 15, 1)
    assert a.top_outside[["token_id", "token", "count", "top1_teacher"]].values.tolist() == [
        [100235, " adventurer", 1, " advent"]
    ]
    assert a.teacher == "phi"


def test_occurrence_totals_add_up(llama, projections):
    texts = [
        "Question: what is 1234 + 56?\nAnswer: 1290.",
        "Café au lait in 東京, naïve résumé…  \t end",
        "<|begin_of_text|>The capital of Freedonia is Fredville.",
        "x" * 50,
    ]
    n_tokens = sum(len(llama(t, add_special_tokens=False)["input_ids"]) for t in texts)
    for W in projections.values():
        t = occurrence_audit(llama, W, texts).table
        assert t.category.tolist() == [*CATEGORIES, "all"]
        body, total = t.iloc[:-1], t.iloc[-1]
        assert total.occurrences == n_tokens
        assert [int(body[c].sum()) for c in INT_COLUMNS] == [int(total[c]) for c in INT_COLUMNS]
        assert (t.outside_gold == t.occurrences - t.gold_common).all()
        assert ((t.gold_common <= t.hkl_common) & (t.hkl_common <= t.occurrences)).all()
        assert t.loc[t.category == "special", "occurrences"].item() == 1  # <|begin_of_text|> in the text


def test_each_token_once_agrees_with_coverage_audit(llama, audits, projections, monkeypatch):
    """When every vocabulary token occurs once, occurrences are the vocabulary counts of `coverage_audit`."""
    s_bytes = token_bytes(llama)
    real = [s for s in range(len(s_bytes)) if s_bytes[s] is not None or s in llama.added_tokens_decoder]
    original = type(llama).__call__

    def once_each(self, texts, **kw):
        return {"input_ids": [real]} if self is llama else original(self, texts, **kw)

    monkeypatch.setattr(type(llama), "__call__", once_each)
    for teacher, W in projections.items():
        occ = occurrence_audit(llama, W, ["all of it"]).table.iloc[:-1].reset_index(drop=True)
        vocab = audits[teacher].table
        assert occ.category.tolist() == vocab.category.tolist()
        assert occ.occurrences.tolist() == vocab.student_tokens.tolist()
        assert occ.gold_common.tolist() == vocab.gold_common.tolist()
        assert occ.hkl_common.tolist() == vocab.hkl_common.tolist()
        assert occ.outside_gold.tolist() == (vocab.student_tokens - vocab.gold_common).tolist()


def test_top_outside_is_deterministic(llama, projections):
    texts = ["56 12 34 99 12", "12 and 99"]  # '12' x3, '99' x2, '34' and '56' once: ties by id
    a = occurrence_audit(llama, projections["qwen"], texts)
    top = a.top_outside
    assert top.token.tolist()[:2] == ["12", "99"] and top["count"].tolist() == [3, 2, 1, 1]
    assert top.token_id.iloc[2] < top.token_id.iloc[3]
    pd.testing.assert_frame_equal(top, occurrence_audit(llama, projections["qwen"], list(texts)).top_outside)
    assert len(occurrence_audit(llama, projections["qwen"], texts, top=1).top_outside) == 1


def test_top1_teacher_spelled_only_with_a_teacher_tokenizer(llama, qwen, projections):
    W = projections["qwen"]
    bare = Projection(W.indices, W.weights, W.row_kind, W.teacher_vocab_size, dict(W.meta))  # as loaded from a file
    assert occurrence_audit(llama, bare, ["347"]).top_outside.top1_teacher.tolist() == [None]
    assert occurrence_audit(llama, bare, ["347"], teacher_tok=qwen).top_outside.top1_teacher.tolist() == ["3"]


def test_occurrence_audit_refuses_bad_input(llama, qwen, phi, projections):
    W = projections["qwen"]
    with pytest.raises(ValueError, match="texts is empty"):
        occurrence_audit(llama, W, [])
    with pytest.raises(ValueError, match="no student tokens"):
        occurrence_audit(llama, W, ["", ""])
    with pytest.raises(TypeError, match="not a single string"):
        occurrence_audit(llama, W, "347")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        occurrence_audit(llama, W, ["347", 347])
    small = Projection(W.indices[:1000], W.weights[:1000], W.row_kind[:1000], W.teacher_vocab_size, {})
    with pytest.raises(ValueError, match=r"student id 100235 \(in texts\[1\]\).*1000 ids"):
        occurrence_audit(llama, small, [", .", "The adventurer"])  # ids 11, 13, 791, 100235
    with pytest.raises(ProjectionMismatch, match="student tokenizer"):
        occurrence_audit(qwen, W, ["347"])  # W is Llama's
    with pytest.raises(ProjectionMismatch, match="teacher tokenizer"):
        occurrence_audit(llama, W, ["347"], teacher_tok=phi)
