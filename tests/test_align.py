"""Span alignment (xtoken.align): properties on random text over real tokenizer pairs."""

import io
import random
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xtoken.align import _gather_bytes, align, align_batch, byte_table

ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789")
    + list("     \t\n\n.,;:!?'\"()-_/+=#%")
    + list("東京都日本語")
    + ["🙂", "👍🏽", "é", "ß", "ñ"]
)
TEXT = st.lists(st.sampled_from(ALPHABET), min_size=0, max_size=120).map("".join)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """A real HF fast tokenizer from a tiny SentencePiece BPE model with byte fallback, trained here."""
    import sentencepiece as spm  # a dev dependency: the SentencePiece pair must never be skipped silently
    from transformers import LlamaTokenizerFast

    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from apples numbers café naïve".split()
    lines = [
        " ".join(rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 999)) for _ in range(12))
        for _ in range(400)
    ]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    d = tmp_path_factory.mktemp("sp")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizerFast.from_pretrained(str(d))
    assert tok.is_fast and "<0xF0>" in tok.get_vocab()
    return tok


def check_alignment(a, s_ids, t_ids, s_tok, t_tok):
    """The three properties: equal bytes per chunk; ordered, non-overlapping spans; full coverage."""
    for side, spans, unpaired, n in (
        ("s", a.student_spans, a.student_unpaired, len(s_ids)),
        ("t", a.teacher_spans, a.teacher_unpaired, len(t_ids)),
    ):
        assert (spans[:, 1] > spans[:, 0]).all()
        assert (spans[1:, 0] >= spans[:-1, 1]).all(), f"{side}: chunks overlap or are out of order"
        covered = np.concatenate([np.arange(x, y) for x, y in spans] + [unpaired]).astype(int)
        assert sorted(covered.tolist()) == list(range(n)), f"{side}: positions dropped or counted twice"
    for k in range(len(a)):
        sb, tb = a.chunk_bytes(k, s_tok, t_tok)
        assert sb == tb
        assert len(sb) > 0 or a.is_special[k]


def run_pair(text, s_tok, t_tok, s_special=True, t_special=True):
    s_ids = s_tok(text, add_special_tokens=s_special)["input_ids"]
    t_ids = t_tok(text, add_special_tokens=t_special)["input_ids"]
    a = align(s_ids, t_ids, s_tok, t_tok)
    check_alignment(a, s_ids, t_ids, s_tok, t_tok)
    return a, s_ids, t_ids


@SETTINGS
@given(TEXT)
def test_llama_qwen_properties(llama, qwen, text):
    text = unicodedata.normalize("NFC", text)  # Qwen normalizes to NFC; Llama does not
    a, s_ids, t_ids = run_pair(text, llama, qwen)
    # same text, same bytes: the only unpaired token is Llama's BOS
    assert a.student_unpaired.tolist() == [0] and a.teacher_unpaired.tolist() == []
    joined = b"".join(a.chunk_bytes(k, llama, qwen)[0] for k in range(len(a)))
    assert joined == text.encode()


@SETTINGS
@given(TEXT)
def test_llama_phi_properties(llama, phi, text):
    a, s_ids, t_ids = run_pair(text, llama, phi)
    assert len(a.teacher_unpaired) == 0 and a.student_unpaired.tolist() == [0]


@SETTINGS
@given(TEXT)
def test_sentencepiece_byte_fallback_properties(sp_tok, llama, text):
    # SentencePiece spells the text with a dummy-prefix space; give Llama the same text
    s_ids = sp_tok(text)["input_ids"]
    t_ids = llama(" " + text, add_special_tokens=False)["input_ids"]
    a = align(s_ids, t_ids, sp_tok, llama)
    check_alignment(a, s_ids, t_ids, sp_tok, llama)
    sp_bytes = _gather_bytes(byte_table(sp_tok), np.array(s_ids, dtype=np.int64)).tobytes()
    if sp_bytes == (" " + text).encode():
        # the same bytes on both sides: everything pairs except the SentencePiece BOS
        assert all(sp_tok.convert_ids_to_tokens(s_ids[p]) == "<s>" for p in a.student_unpaired)
        assert len(a.teacher_unpaired) == 0
    # otherwise HF's Metaspace rewrote leading/double spaces: only the structural properties hold


def test_sentencepiece_byte_fallback_example(sp_tok, llama):
    text = "the 東京 café 🙂 had 12 apples\tand\nnaïve numbers"
    s_ids = sp_tok(text)["input_ids"]
    t_ids = llama(" " + text, add_special_tokens=False)["input_ids"]
    assert any(sp_tok.convert_ids_to_tokens(i).startswith("<0x") for i in s_ids)  # byte fallback used
    a = align(s_ids, t_ids, sp_tok, llama)
    check_alignment(a, s_ids, t_ids, sp_tok, llama)
    assert len(a.teacher_unpaired) == 0 and len(a.student_unpaired) <= 1


def test_bos_on_one_side_only(llama, qwen):
    text = "In 2024, 1,234 apples cost $56.78 each."
    s_ids = llama(text)["input_ids"]
    t_ids = qwen(text)["input_ids"]
    assert s_ids[0] == llama.bos_token_id and t_ids[0] != qwen.bos_token_id
    a = align(s_ids, t_ids, llama, qwen)
    assert a.student_unpaired.tolist() == [0] and len(a.teacher_unpaired) == 0
    assert a.student_spans[0].tolist() == [1, 2] and a.teacher_spans[0].tolist() == [0, 1]  # 'In' ~ 'In'
    # ' 202','4' (Llama) against ' ','2','0','2','4' (Qwen): one chunk each for ' ' , '202', '4'
    texts = [a.chunk_bytes(k, llama, qwen)[0] for k in range(len(a))]
    assert texts[:5] == [b"In", b" ", b"202", b"4", b","]
    # next-token bookkeeping: the teacher's first chunk starts at position 0 and has no predicting logit
    assert not a.predictable[0] and a.logit_positions("teacher")[0] is None
    assert a.logit_positions("student")[2].tolist() == [2] and a.logit_positions("teacher")[2].tolist() == [1, 2, 3]


def test_paired_specials_and_chat_markers(llama, qwen):
    """Specials with the same role on both sides pair up; a marker on one side only is unpaired."""
    s_ids = (
        [llama.bos_token_id]
        + llama("Hi there", add_special_tokens=False)["input_ids"]
        + [llama.convert_tokens_to_ids("<|eot_id|>")]
    )
    t_ids = qwen("Hi there", add_special_tokens=False)["input_ids"] + [qwen.convert_tokens_to_ids("<|im_end|>")]
    a = align(s_ids, t_ids, llama, qwen)
    check_alignment(a, s_ids, t_ids, llama, qwen)
    assert a.student_unpaired.tolist() == [0]
    assert a.is_special[-1] and a.student_spans[-1].tolist() == [len(s_ids) - 1, len(s_ids)]


def test_normalizer_disagreement_does_not_lump(llama, qwen):
    """Decomposed accents: Qwen's NFC rewrites them, Llama keeps them. Each costs a few tokens only."""
    text = unicodedata.normalize("NFD", "café au lait. ") + " ".join(f"word{i} and {i * 37}" for i in range(60))
    s_ids = llama(text, add_special_tokens=False)["input_ids"]
    t_ids = qwen(text)["input_ids"]
    a = align(s_ids, t_ids, llama, qwen)
    check_alignment(a, s_ids, t_ids, llama, qwen)
    assert len(a.student_unpaired) <= 3 and len(a.teacher_unpaired) <= 3
    biggest = int((a.student_spans[:, 1] - a.student_spans[:, 0]).max())
    assert biggest <= 3  # the TRL walk would put everything after 'caf' in one group


def test_truncation_at_different_places(llama, qwen):
    text = " ".join(f"item {i} costs {i * 13} dollars." for i in range(50))
    s_ids = llama(text, add_special_tokens=False)["input_ids"]
    t_ids = qwen(text)["input_ids"][:200]
    a = align(s_ids, t_ids, llama, qwen)
    check_alignment(a, s_ids, t_ids, llama, qwen)
    last = a.student_spans[-1, 1]
    assert a.student_unpaired.tolist() == list(range(last, len(s_ids)))
    assert len(a.teacher_unpaired) <= 1  # at most a teacher token cut mid-student-token


def test_align_batch_left_and_right_padding(llama, qwen):
    texts = ["The year 1999 ended.", "Short one"]
    s_rows = [llama(x)["input_ids"] for x in texts]
    t_rows = [qwen(x)["input_ids"] for x in texts]
    L_s, L_t = max(map(len, s_rows)) + 2, max(map(len, t_rows)) + 1
    s = torch.zeros(2, L_s, dtype=torch.long)
    sm = torch.zeros_like(s)
    t = torch.zeros(2, L_t, dtype=torch.long)
    tm = torch.zeros_like(t)
    for b in range(2):  # student left-padded, teacher right-padded
        s[b, L_s - len(s_rows[b]) :] = torch.tensor(s_rows[b])
        sm[b, L_s - len(s_rows[b]) :] = 1
        t[b, : len(t_rows[b])] = torch.tensor(t_rows[b])
        tm[b, : len(t_rows[b])] = 1
    out = align_batch(s, t, llama, qwen, student_mask=sm, teacher_mask=tm)
    for b, a in enumerate(out):
        ref = align(s_rows[b], t_rows[b], llama, qwen)
        pad = L_s - len(s_rows[b])
        assert (a.student_spans - pad).tolist() == ref.student_spans.tolist()
        assert a.teacher_spans.tolist() == ref.teacher_spans.tolist()
        assert (a.student_unpaired - pad).tolist() == ref.student_unpaired.tolist()
        assert a.predictable.tolist() == ref.predictable.tolist()  # a pad logit never predicts a chunk


def test_token_table_matches_logit_positions(llama, qwen):
    text = "We counted 12345 sheep."
    a = align(llama(text)["input_ids"], qwen(text)["input_ids"], llama, qwen)
    chunk, logit_pos, ids, offset = a.token_table("teacher")
    ok = np.flatnonzero(a.predictable)
    for k, c in enumerate(ok):
        assert logit_pos[chunk == k].tolist() == a.logit_positions("teacher")[c].tolist()
        assert ids[chunk == k].tolist() == a.teacher_ids[a.teacher_spans[c, 0] : a.teacher_spans[c, 1]].tolist()
        assert offset[chunk == k].tolist() == list(range((chunk == k).sum()))


def test_byte_table_is_cached(llama):
    assert byte_table(llama) is byte_table(llama)


def test_small_window_resync_matches_vectorised():
    """The plain-Python small-window resync picks the same pair as the numpy one, on random near-equal
    byte strings (insertions, substitutions, ends of data)."""
    import random

    from xtoken.align import _resync_in, _resync_small

    rng = random.Random(0)
    for _ in range(500):
        base = bytes(rng.choice(b"abc ") for _ in range(rng.randint(1, 40)))
        other = bytearray(base)
        for _ in range(rng.randint(0, 3)):
            k = rng.randrange(len(other) + 1)
            other[k : k + rng.randint(0, 2)] = bytes(rng.choice(b"abcx") for _ in range(rng.randint(0, 3)))
        sides = []
        for data in (base, bytes(other)):
            cuts = (
                sorted(set(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12)))))
                if len(data) > 1
                else []
            )
            begin = np.array([0] + cuts, dtype=np.int64) if data else np.zeros(0, dtype=np.int64)
            sides.append((np.frombuffer(data, dtype=np.uint8), begin))
        (sb, s_begin), (tb, t_begin) = sides
        if not len(s_begin) or not len(t_begin):
            continue
        si, ti = rng.randrange(len(s_begin)), rng.randrange(len(t_begin))
        agree = rng.choice([2, 4, 16])
        assert _resync_small(
            sb.tobytes(), s_begin.tolist(), si, tb.tobytes(), t_begin.tolist(), ti, 4, agree
        ) == _resync_in(sb, s_begin, si, tb, t_begin, ti, 4, agree)


def _same(a, b):
    return (
        all(
            np.array_equal(getattr(a, f), getattr(b, f))
            for f in ("student_spans", "teacher_spans", "student_unpaired", "teacher_unpaired", "is_special")
        )
        and a.student_valid == b.student_valid
        and a.teacher_valid == b.teacher_valid
    )


def test_alignment_memo_returns_what_align_computes(llama, qwen):
    """A memo hit equals a fresh alignment, also when the same row comes back padded differently
    (another batch) or left-padded; a different row is a miss, never a wrong hit; the memo is bounded."""
    from xtoken.align import AlignmentMemo

    texts = ["The year 1999 ended.", "Short one", unicodedata.normalize("NFD", "café 123 au lait")]
    s_rows = [llama(x)["input_ids"] for x in texts]
    t_rows = [qwen(x)["input_ids"] for x in texts]
    memo = AlignmentMemo(max_rows=2)
    for b in range(3):
        fresh = align(s_rows[b], t_rows[b], llama, qwen)
        assert _same(align(s_rows[b], t_rows[b], llama, qwen, memo=memo), fresh)
        # the same row inside a wider, left-padded student batch: a hit, shifted by the padding
        pad = 3
        s = np.array([0] * pad + s_rows[b])
        sm = np.array([0] * pad + [1] * len(s_rows[b]))
        hits = memo.hits
        got = align(s, t_rows[b], llama, qwen, student_mask=sm, memo=memo)
        assert memo.hits == hits + 1
        ref = align(s, t_rows[b], llama, qwen, student_mask=sm)
        assert _same(got, ref) and (got.student_spans - pad).tolist() == fresh.student_spans.tolist()
    assert memo.misses == 3 and len(memo) == 2  # three rows seen, the oldest dropped
    # an altered row (one teacher token less) is not confused with the stored one
    short = align(s_rows[1], t_rows[1][:-1], llama, qwen, memo=memo)
    assert memo.misses == 4 and _same(short, align(s_rows[1], t_rows[1][:-1], llama, qwen))
    with pytest.raises(ValueError):
        AlignmentMemo(max_rows=0)


def test_alignments_own_their_ids(llama, qwen):
    """The DataLoader moves a collated batch into shared memory, freeing the tensors' old storage: an
    Alignment must hold copies of the ids, not views (a view read garbage ids in a worker-process test)."""
    text = "The year 1999 ended."
    s = torch.tensor([llama(text)["input_ids"]])
    t = torch.tensor([qwen(text)["input_ids"]])
    before = (s[0].tolist(), t[0].tolist())
    a = align_batch(s, t, llama, qwen)[0]
    s.fill_(7)
    t.fill_(7)
    assert (a.student_ids.tolist(), a.teacher_ids.tolist()) == before
    rows = np.array([llama(text)["input_ids"]])
    b = align(rows[0], qwen(text)["input_ids"], llama, qwen)
    rows[0, :] = 7
    assert b.student_ids.tolist() == before[0]


def reference_walk(s_bytes, s_ends, t_bytes, t_ends, window, agree_bytes):
    """`_text_walk` as first written (up to commit 1544e40), kept as the slow, plain definition: per
    agreeing stretch, `np.intersect1d` of both sides' end offsets relative to the stretch start; each
    resynchronisation is the numpy search over the small window, then over the full one."""
    from xtoken.align import _agreement, _resync_in

    ns, nt = len(s_ends), len(t_ends)
    s_begin = np.concatenate([[0], s_ends[:-1]]).astype(np.int64)
    t_begin = np.concatenate([[0], t_ends[:-1]]).astype(np.int64)
    out_s, out_t, un_s, un_t = [np.zeros((0, 2), dtype=np.int64)], [np.zeros((0, 2), dtype=np.int64)], [], []
    si = ti = sb = tb = 0
    while si < ns and ti < nt:
        agree = _agreement(s_bytes, sb, t_bytes, tb)
        s_hi = int(np.searchsorted(s_ends, sb + agree, side="right"))
        t_hi = int(np.searchsorted(t_ends, tb + agree, side="right"))
        _, i_s, i_t = np.intersect1d(
            s_ends[si:s_hi] - sb, t_ends[ti:t_hi] - tb, assume_unique=True, return_indices=True
        )
        if len(i_s):
            s_stop, t_stop = si + i_s + 1, ti + i_t + 1
            out_s.append(np.stack([np.concatenate([[si], s_stop[:-1]]), s_stop], 1))
            out_t.append(np.stack([np.concatenate([[ti], t_stop[:-1]]), t_stop], 1))
            si, ti = int(s_stop[-1]), int(t_stop[-1])
            sb, tb = int(s_ends[si - 1]), int(t_ends[ti - 1])
        if si >= ns or ti >= nt:
            break
        small = min(4, window)
        found = _resync_in(s_bytes, s_begin, si, t_bytes, t_begin, ti, small, agree_bytes)
        if found is None and window > small:
            found = _resync_in(s_bytes, s_begin, si, t_bytes, t_begin, ti, window, agree_bytes)
        if found is None:
            break
        un_s += range(si, found[0])
        un_t += range(ti, found[1])
        si, ti = found
        sb, tb = int(s_begin[si]), int(t_begin[ti])
    un_s += range(si, ns)
    un_t += range(ti, nt)
    return np.concatenate(out_s), np.concatenate(out_t), np.array(un_s, dtype=np.int64), np.array(un_t, dtype=np.int64)


def _walk_inputs(rng, data):
    """Random token cuts of `data`: (bytes array, cumulative token ends)."""
    n = len(data)
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, n // 2 + 1)))) if n > 1 else []
    ends = np.array(cuts + [n] if n else [], dtype=np.int64)
    return np.frombuffer(data, dtype=np.uint8), ends


def test_text_walk_matches_reference_on_random_bytes():
    """The walk equals the plain reference (same chunks, same unpaired tokens, same order) on near-equal
    byte strings: substitutions, insertions and deletions (an NFC rewrite is one), truncation of either
    side, texts present on one side only; windows from 1 to 32, agreement from 1 to 16 bytes."""
    from xtoken.align import _text_walk

    rng = random.Random(1)
    accents = [b"e\xcc\x81", b"\xc3\xa9", b"a\xcc\x88", b"\xc3\xa4", b"x", b""]
    for case in range(1500):
        base = bytearray(rng.choice(b"ab c") for _ in range(rng.randint(0, 120)))
        other = bytearray(base)
        for _ in range(rng.randint(0, 6)):  # edits on the teacher side
            k = rng.randrange(len(other) + 1)
            other[k : k + rng.randint(0, 3)] = rng.choice(accents)
        if rng.random() < 0.2:  # truncation at different places
            other = other[: rng.randint(0, len(other))]
        if rng.random() < 0.5:
            base, other = other, base
        (sb, s_ends), (tb, t_ends) = _walk_inputs(rng, bytes(base)), _walk_inputs(rng, bytes(other))
        window, agree = rng.choice([1, 2, 4, 8, 32]), rng.choice([1, 2, 4, 16])
        got = _text_walk(sb, s_ends, tb, t_ends, window, agree)
        ref = reference_walk(sb, s_ends, tb, t_ends, window, agree)
        for g, r in zip(got, ref):
            assert g.dtype == r.dtype and np.array_equal(g, r), (case, window, agree)


def test_align_matches_reference_walk_on_nfd_text(llama, qwen, phi, monkeypatch):
    """`align` with the walk equals `align` with the reference walk on real tokenizations that disagree
    (decomposed accents Qwen's NFC rewrites, numbers, truncation, a BOS on one side), two pairs."""
    import xtoken.align as A

    rng = random.Random(2)
    words = "the of and 2024 apples 12.50 café naïve résumé déjà über Ångström x_1".split()
    rows = []
    for k in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        text = unicodedata.normalize(rng.choice(["NFD", "NFC"]), text)
        s_tok, t_tok = (llama, qwen) if k % 3 else (llama, phi)
        s_ids = s_tok(text, add_special_tokens=k % 2 == 0)["input_ids"]
        t_ids = t_tok(text)["input_ids"]
        if k % 5 == 0:
            t_ids = t_ids[: rng.randint(0, len(t_ids))]
        rows.append((s_ids, t_ids, s_tok, t_tok, rng.choice([4, 32])))
    got = [A.align(*row[:4], window=row[4]) for row in rows]
    monkeypatch.setattr(A, "_text_walk", reference_walk)
    ref = [A.align(*row[:4], window=row[4]) for row in rows]
    assert sum(len(a.student_unpaired) for a in ref) > 60  # the disagreements are there
    for a, b in zip(got, ref):
        assert _same(a, b)
