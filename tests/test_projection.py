"""W as the paper builds it: expected rows, invariants, canonicalization, determinism, persistence."""

import hashlib
import json

import pytest
import torch

from xtoken.projection import EMPTY, EXACT, MULTI, SPECIAL, Projection, ProjectionMismatch, build_projection


@pytest.fixture(scope="module")
def w_qwen(llama, qwen):
    return build_projection(llama, qwen)


@pytest.fixture(scope="module")
def w_phi(llama, phi):
    return build_projection(llama, phi)


def test_paper_rows(w_qwen, w_phi, qwen):
    # Llama '201' -> Qwen '2','0','1' with beta*gamma^i normalized (the paper's example)
    assert [(t, w) for t, _, w in w_qwen.row("201")] == [("2", 0.9009), ("0", 0.0901), ("1", 0.009)]
    assert [w for *_, w in w_qwen.row("20")] == [0.9091, 0.0909]
    # 'Hundreds' -> Phi 'Hund' + 'reds' (the paper's over-conservative-matching example)
    assert [(t, w) for t, _, w in w_phi.row("Hundreds")] == [("Hund", 0.9091), ("reds", 0.0909)]
    # o200k packs digits like Llama: exact match, weight 1
    assert w_phi.row("201") == [("201", 667, 1.0)]
    # a repeated teacher id accumulates its weights: '999' -> '9' only
    assert w_qwen.row("999") == [("9", qwen.convert_tokens_to_ids("9"), 1.0)]


def test_four_token_row_weights(llama, qwen, w_qwen):
    spans = (w_qwen.indices >= 0).sum(1)
    four = torch.nonzero((spans == 4) & (w_qwen.row_kind == MULTI)).flatten()
    # a 4-token row with four distinct teacher ids has the paper's (0.9000, 0.0900, 0.0090, 0.0009)
    for s in four.tolist():
        w = w_qwen.weights[s].tolist()
        if len(set(w_qwen.indices[s].tolist())) == 4:
            # exactly 0.9/0.9999 = 0.90009..., which the paper prints as 0.9000
            assert w == pytest.approx([0.9, 0.09, 0.009, 0.0009], abs=1e-4)
            break
    else:
        pytest.fail("no 4-token row found")


@pytest.mark.parametrize("which", ["w_qwen", "w_phi"])
def test_rows_are_distributions_or_empty_and_counted(which, request):
    W = request.getfixturevalue(which)
    assert (W.weights >= 0).all()
    sums = W.weights.sum(1)
    empty = W.row_kind == EMPTY
    assert torch.allclose(sums[~empty], torch.ones(int((~empty).sum())), atol=1e-6)
    assert (sums[empty] == 0).all() and (W.indices[empty] == -1).all()
    assert int(empty.sum()) == sum(W.meta["counts"].values())
    exact = W.row_kind == EXACT
    assert (W.weights[exact, 0] == 1.0).all() and (W.indices[exact, 1:] == -1).all()
    assert W.indices.max() < W.teacher_vocab_size


def test_canonicalization_is_byte_level_without_public_defects(llama, qwen, w_qwen):
    tid = qwen.convert_tokens_to_ids
    # '_' is an underscore, not a space marker (the official code turns '__init__' into ' _init__')
    assert w_qwen.row("__") == [("__", tid("__"), 1.0)]
    assert w_qwen.row("_") == [("_", tid("_"), 1.0)]
    # 'ĉ' is TAB in the byte map, not a newline
    assert w_qwen.row("ĉ") == [("ĉ", tid("ĉ"), 1.0)]
    assert w_qwen.row("Ċ") == [("Ċ", tid("Ċ"), 1.0)]
    # the space before punctuation is kept
    assert w_qwen.row("Ġ,") == [("Ġ,", tid("Ġ,"), 1.0)]


def test_partial_utf8_tokens_match_by_bytes(llama, qwen, w_qwen):
    from xtoken.canonical import token_bytes

    lb, qb = token_bytes(llama), token_bytes(qwen)
    q_index = {b: i for i, b in enumerate(qb) if b is not None}
    checked = 0
    for s, b in enumerate(lb):
        if b is None:
            continue
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            if b in q_index:  # same partial sequence on both sides: an exact match, not U+FFFD noise
                assert w_qwen.row_kind[s] == EXACT and int(w_qwen.indices[s, 0]) == q_index[b]
                checked += 1
    assert checked > 100


def test_special_tokens_map_by_role(llama, qwen, phi, w_qwen, w_phi):
    assert w_qwen.row("<|eot_id|>") == [("<|im_end|>", 151645, 1.0)]
    assert w_qwen.row("<|start_header_id|>") == [("<|im_start|>", 151644, 1.0)]
    assert w_qwen.row("<|end_of_text|>") == [("<|endoftext|>", 151643, 1.0)]
    assert w_phi.row("<|eot_id|>") == [("<|end|>", 200020, 1.0)]
    assert w_qwen.row_kind[llama.convert_tokens_to_ids("<|reserved_special_token_7|>")] == EMPTY
    assert int((w_qwen.row_kind == SPECIAL).sum()) == 3


def test_max_span_skips_long_retokenizations(llama, qwen):
    short = build_projection(llama, qwen, max_span=2)
    default = build_projection(llama, qwen)
    assert short.meta["counts"]["too_long"] > default.meta["counts"]["too_long"]
    assert short.row_kind[llama.convert_tokens_to_ids("201")] == EMPTY  # 3 teacher tokens > 2
    assert short.row("20")[0][0] == "2"


def test_deterministic_bit_identical_file(llama, qwen, tmp_path, w_qwen):
    again = build_projection(llama, qwen)
    a, b = w_qwen.save(tmp_path / "a.safetensors"), again.save(tmp_path / "b.safetensors")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_save_load_and_refuse_wrong_tokenizers(llama, qwen, phi, w_qwen, tmp_path):
    path = w_qwen.save(tmp_path / "w.safetensors")
    back = Projection.load(path, llama, qwen)
    assert torch.equal(back.indices, w_qwen.indices) and torch.equal(back.weights, w_qwen.weights)
    assert back.teacher_vocab_size == 151936 and back.meta["counts"] == w_qwen.meta["counts"]
    with pytest.raises(ProjectionMismatch, match="teacher tokenizer"):
        Projection.load(path, llama, phi)
    with pytest.raises(ProjectionMismatch, match="student tokenizer"):
        Projection.load(path, qwen, qwen)


def test_sparse_view_and_projected_distribution(w_qwen):
    S = w_qwen.to_sparse()
    assert S.shape == (128256, 151936)
    p = torch.softmax(torch.randn(1, 128256, dtype=torch.float64), -1)
    proj = (S.to(torch.float64).t() @ p.t()).t()
    lost = p[0, w_qwen.row_kind == EMPTY].sum()
    assert torch.allclose(proj.sum(), 1 - lost) and (proj >= 0).all()


def test_top1_and_exact_pairs(llama, qwen, w_qwen):
    s = llama.convert_tokens_to_ids("201")
    assert w_qwen.top1()[s] == qwen.convert_tokens_to_ids("2") and w_qwen.exact_pairs()[s] == -1
    s = llama.convert_tokens_to_ids("Ġthe")
    assert w_qwen.top1()[s] == w_qwen.exact_pairs()[s] == qwen.convert_tokens_to_ids("Ġthe")


def test_restrict_reindexes_and_renormalizes(llama, qwen, w_qwen):
    s_ids = llama.convert_tokens_to_ids(["201", "2", "Ġthe"])
    t_ids = qwen.convert_tokens_to_ids(["2", "0", "Ġthe"])  # '1' left out
    R = w_qwen.restrict(s_ids, t_ids)
    assert R.indices.shape == (3, 4) and R.teacher_vocab_size == 3
    assert R.indices[0, :2].tolist() == [0, 1] and R.indices[0, 2] == -1
    assert torch.allclose(R.weights[0].sum(), torch.tensor(1.0))
    assert R.row_kind[2] == EXACT and R.indices[2, 0] == 2


def _sentencepiece_tokenizer(tmp_path):
    """A small SentencePiece-style tokenizer (Metaspace '▁', BPE with byte fallback) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    text = ["the cat sat on the mat with 12 apples and 345 pears", "Hundreds of numbers 1 2 3 4 5 6 7 8 9 0"] * 50
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tk.train_from_iterator(text, trainer)
    # byte-fallback pieces live in the model vocabulary, as in Llama-2's tokenizer.json
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    path = tmp_path / "sp.json"
    path.write_text(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_with_byte_fallback_both_directions(llama, qwen, tmp_path):
    sp = _sentencepiece_tokenizer(tmp_path)
    W = build_projection(sp, llama)  # SentencePiece student, byte-level teacher
    assert W.row("▁the")[0][:2] == ("Ġthe", llama.convert_tokens_to_ids("Ġthe"))
    assert W.row("<0x09>") == [("ĉ", llama.convert_tokens_to_ids("ĉ"), 1.0)]
    assert W.row("</s>") == [("<|end_of_text|>", 128001, 1.0)]
    back = build_projection(llama, sp)  # byte-level student, SentencePiece teacher
    assert back.row("ĉ") == [("<0x09>", sp.convert_tokens_to_ids("<0x09>"), 1.0)]
    assert back.row("Ġthe") == [("▁the", sp.convert_tokens_to_ids("▁the"), 1.0)]
    # 'z' never occurs in the SP training text: the teacher spells ' z' as '▁' + byte fallback <0x7A>
    assert [t for t, *_ in back.row("Ġz")] == ["▁", "<0x7A>"]
    # ' world' needs more than max_span=4 SP pieces: an empty row, counted as too_long
    assert back.row("Ġworld") == [] and back.meta["counts"]["too_long"] > 0


@pytest.mark.parametrize(
    "teacher,fixture,tok", [("Qwen3-4B", "w_qwen", "qwen"), ("Phi-4-mini-instruct", "w_phi", "phi")]
)
def test_committed_w_files_rebuild_to_the_same_bytes(teacher, fixture, tok, request, llama, tmp_path):
    """results/W_*.safetensors (notebook 01) hold exactly what build_projection produces today, byte for byte:
    every tensor and the metadata (with meta["teacher_tokens"] and the content digest that load checks)."""
    from pathlib import Path

    committed = Path(__file__).parent.parent / "results" / f"W_Llama-3.2-1B_to_{teacher}.safetensors"
    built = request.getfixturevalue(fixture)
    rebuilt = built.save(tmp_path / "w.safetensors")
    assert rebuilt.read_bytes() == committed.read_bytes()
    new = built.meta | {"digest": built.digest()}
    back = Projection.load(committed, llama, request.getfixturevalue(tok))
    assert back.digest() == built.digest() == new["digest"]
    # the tokenizer's id range: len(tok), or its largest id + 1 (Phi-4: 200,010 tokens, ids up to 200,028)
    t = request.getfixturevalue(tok)
    assert back.teacher_tokens == built.teacher_tokens == max(len(t), max(t.get_vocab().values()) + 1)
