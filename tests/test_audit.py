"""The coverage audit reproduces the paper's Table 8 with the real vocabularies."""

import pytest

from xtoken.audit import coverage_audit, token_category
from xtoken.projection import build_projection


@pytest.fixture(scope="module")
def audits(llama, qwen, phi):
    return {"qwen": coverage_audit(llama, qwen), "phi": coverage_audit(llama, phi)}


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
