"""W refuses bad input loudly: wrong tokenizers, widths that do not fit, bad ids, damaged or foreign files."""

import json
import struct
from pathlib import Path

import pytest
import torch

from xtoken.projection import EMPTY, Projection, ProjectionMismatch
from xtoken.tokenizers import tokenizer_fingerprint

RESULTS = Path(__file__).resolve().parents[1] / "results"
W_QWEN = RESULTS / "W_Llama-3.2-1B_to_Qwen3-4B.safetensors"
W_PHI = RESULTS / "W_Llama-3.2-1B_to_Phi-4-mini-instruct.safetensors"


@pytest.fixture(scope="module")
def w_qwen(llama, qwen):
    return Projection.load(W_QWEN, llama, qwen)


@pytest.fixture(scope="module")
def w_phi(llama, phi):
    return Projection.load(W_PHI, llama, phi)


@pytest.fixture(scope="module")
def local(llama, qwen):
    """Restricted (renumbered) tokenizers as the miniature makes them, and their ids in the full vocabularies."""
    from xtoken.mini.models import keep_ids_for, restrict_tokenizer

    texts = ["The 3 cats ate 201 apples.", "Hundreds of numbers: 12 + 345 = 357"]
    s_tok, s_l2f = restrict_tokenizer(llama, keep_ids_for(texts, llama))
    t_tok, t_l2f = restrict_tokenizer(qwen, keep_ids_for(texts, qwen))
    return s_tok, s_l2f, t_tok, t_l2f


# ---- tokenizer checks ---------------------------------------------------------------------------


def test_check_tokenizers_names_the_side_and_both_tokenizers(llama, qwen, phi, w_qwen):
    assert w_qwen.check_tokenizers(llama, qwen) is w_qwen
    with pytest.raises(ProjectionMismatch, match="teacher tokenizer 'Qwen/Qwen3-4B'") as e:
        w_qwen.check_tokenizers(llama, phi)
    assert "microsoft/Phi-4-mini-instruct" in str(e.value) and tokenizer_fingerprint(phi) in str(e.value)
    with pytest.raises(ProjectionMismatch, match="student tokenizer 'meta-llama/Llama-3.2-1B'"):
        w_qwen.check_tokenizers(qwen, qwen)
    w_qwen.check_tokenizers(None, qwen)  # one side only
    w_qwen.check_tokenizers(llama, None)


def test_restrict_records_the_local_tokenizers_and_stays_checkable(llama, qwen, w_qwen, local, tmp_path):
    s_tok, s_l2f, t_tok, t_l2f = local
    R = w_qwen.restrict(s_l2f, t_l2f, student_tok=s_tok, teacher_tok=t_tok)
    assert R.meta["student_fingerprint"] == tokenizer_fingerprint(s_tok)
    assert R.meta["teacher_fingerprint"] == tokenizer_fingerprint(t_tok)
    assert R.meta["restricted_from"] == tokenizer_fingerprint(llama)
    assert R.meta["restricted_from_teacher"] == tokenizer_fingerprint(qwen)
    R.check_tokenizers(s_tok, t_tok)
    with pytest.raises(ProjectionMismatch, match="teacher"):
        R.check_tokenizers(s_tok, qwen)  # the full tokenizer is not the model's local one
    # the local tokenizers as the miniature stores them (save_pretrained, reloaded): same fingerprints
    from xtoken.mini.models import LocalVocab

    back = LocalVocab.load(LocalVocab("qwen3", qwen, t_l2f.tolist(), local_tok=t_tok).save(tmp_path / "t"))
    path = R.save(tmp_path / "r.safetensors")
    Projection.load(path, s_tok, back.tok)
    with pytest.raises(ProjectionMismatch, match="student"):
        Projection.load(path, llama, back.tok)


def test_restrict_refuses_local_tokenizers_that_spell_other_ids(w_qwen, local):
    s_tok, s_l2f, t_tok, t_l2f = local
    with pytest.raises(ProjectionMismatch, match="teacher tokenizer"):
        w_qwen.restrict(s_l2f, t_l2f.flip(0), student_tok=s_tok, teacher_tok=t_tok)


def test_teacher_tokens_recorded_and_kept_by_restrict(llama, qwen, w_qwen, local):
    assert w_qwen.teacher_vocab_size == 151936 and w_qwen.teacher_tokens == len(qwen) == 151669
    s_tok, s_l2f, t_tok, t_l2f = local
    assert w_qwen.restrict(s_l2f, t_l2f).teacher_tokens == len(t_l2f)
    padded = torch.cat([t_l2f, torch.tensor([151700, 151800])])  # two padded teacher columns, last
    R = w_qwen.restrict(s_l2f, padded)
    assert (R.teacher_vocab_size, R.teacher_tokens) == (len(t_l2f) + 2, len(t_l2f))
    with pytest.raises(ValueError, match="padded ids"):
        w_qwen.restrict(s_l2f, torch.cat([torch.tensor([151700]), t_l2f]))


def test_build_projection_teacher_width(llama, qwen):
    from xtoken.projection import build_projection

    with pytest.raises(ValueError, match="smaller than the teacher tokenizer"):
        build_projection(llama, qwen, teacher_vocab_size=151_000)


def test_with_teacher_width(w_qwen):
    narrow = w_qwen.with_teacher_width(151669)
    assert narrow.teacher_vocab_size == 151669 and narrow.teacher_tokens == 151669
    assert narrow.indices is w_qwen.indices and w_qwen.teacher_vocab_size == 151936
    assert w_qwen.with_teacher_width(152064).teacher_vocab_size == 152064
    with pytest.raises(ValueError, match="151669"):
        w_qwen.with_teacher_width(151668)


def test_older_file_without_teacher_tokens_loads(qwen, tmp_path):
    """A W file written before meta["teacher_tokens"] and meta["digest"] existed still loads: teacher_tokens is
    derived from the teacher tokenizer when given, else unknown (no column treated as padding)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(W_QWEN), framework="pt") as f:
        meta = json.loads(f.metadata()["xtoken_projection"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "older.safetensors"
    meta = {k: v for k, v in meta.items() if k not in ("teacher_tokens", "digest")}
    save_file(tensors, str(old), metadata={"xtoken_projection": json.dumps(meta, sort_keys=True)})
    assert "teacher_tokens" not in json.loads(_header(old)["__metadata__"]["xtoken_projection"])
    assert Projection.load(old).teacher_tokens is None
    assert Projection.load(old, teacher_tok=qwen).teacher_tokens == 151669


# ---- ids ----------------------------------------------------------------------------------------


def test_row_refuses_negative_and_out_of_range_ids(w_qwen):
    assert w_qwen.row(0) == [("!", 0, 1.0)]
    with pytest.raises(IndexError, match=r"student id -1 is out of range: W has rows 0\.\.128255"):
        w_qwen.row(-1)
    with pytest.raises(IndexError, match="student id 128256 is out of range"):
        w_qwen.row(128256)


def test_restrict_refuses_ids_outside_w(w_qwen):
    with pytest.raises(IndexError, match=r"student_ids holds -1, outside W's range 0\.\.128255"):
        w_qwen.restrict([0, -1], [0, 1])
    with pytest.raises(IndexError, match="teacher_ids holds 151936"):
        w_qwen.restrict([0, 1], [0, 151936])
    with pytest.raises(ValueError, match="duplicates"):
        w_qwen.restrict([0, 1], [5, 5])


# ---- files --------------------------------------------------------------------------------------


def _header(path) -> dict:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def _flip(path, out, tensor: str, element: int, byte: int, bit: int) -> Path:
    """A copy of a safetensors file with one bit of one element of ``tensor`` flipped (a storage fault)."""
    raw = bytearray(Path(path).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    info = json.loads(raw[8 : 8 + n])[tensor]
    size = {"I32": 4, "F32": 4, "U8": 1, "I64": 8}[info["dtype"]]
    raw[8 + n + info["data_offsets"][0] + element * size + byte] ^= 1 << bit
    Path(out).write_bytes(bytes(raw))
    return Path(out)


@pytest.fixture(scope="module")
def small_file(w_qwen, local, tmp_path_factory):
    """A restricted W saved today (so with a digest)."""
    s_tok, s_l2f, t_tok, t_l2f = local
    R = w_qwen.restrict(s_l2f, t_l2f, student_tok=s_tok, teacher_tok=t_tok)
    return R, R.save(tmp_path_factory.mktemp("w") / "small.safetensors")


def _resave(path, out, **changes) -> Path:
    """The file's tensors and metadata with some tensors replaced (or dropped: None)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for k, v in changes.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    save_file(tensors, str(out), metadata=meta)
    return Path(out)


def test_save_records_a_digest_and_load_checks_it(small_file, tmp_path):
    from xtoken.projection import ProjectionFileError

    R, path = small_file
    meta = json.loads(_header(path)["__metadata__"]["xtoken_projection"])
    assert meta["digest"] == R.digest()
    assert Projection.load(path).digest() == R.digest()
    # the lowest mantissa bit of one weight: every row still sums to 1 within rounding, only the digest tells
    row = int((R.row_kind != EMPTY).nonzero()[0, 0])
    bad = _flip(path, tmp_path / "flip.safetensors", "weights", row * R.top_k, 0, 0)
    with pytest.raises(ProjectionFileError, match="digest") as e:
        Projection.load(bad)
    assert str(bad) in str(e.value)


def test_bit_flipped_index_is_refused(small_file, tmp_path):
    from xtoken.projection import ProjectionFileError

    R, path = small_file
    row = int((R.row_kind != EMPTY).nonzero()[0, 0])
    bad = _flip(path, tmp_path / "flip.safetensors", "indices", row * R.top_k, 3, 7)  # the int32's sign bit
    with pytest.raises(ProjectionFileError, match=rf"teacher index -\d+ at row {row} is outside"):
        Projection.load(bad)


@pytest.mark.parametrize(
    "defect,match",
    [
        ("nan", "is not finite"),
        ("negative", "is negative"),
        ("huge", "sums to"),
        ("half", "sums to"),
        ("index", "teacher index 999999"),
        ("kind", "unknown row kind"),
        ("missing", r"\['row_kind'\] missing"),
    ],
)
def test_damaged_content_is_refused_with_one_clear_error(small_file, tmp_path, defect, match):
    """Files without a digest (as older ones) still get every structural check."""
    from xtoken.projection import ProjectionFileError

    R, path = small_file
    row = int((R.row_kind != EMPTY).nonzero()[0, 0])
    idx, w, kind = R.indices.to(torch.int32).clone(), R.weights.clone(), R.row_kind.clone()
    change = {}
    if defect == "nan":
        w[row, 0] = float("nan")
    elif defect == "negative":
        w[row, 0] = -w[row, 0]
    elif defect == "huge":
        w[row, 0] = 1e30
    elif defect == "half":
        w[row] = w[row] / 2
    elif defect == "index":
        idx[row, 0] = 999999
    elif defect == "kind":
        kind[row] = 7
    change = {"indices": idx, "weights": w, "row_kind": kind}
    if defect == "missing":
        change = {"row_kind": None}
    out = _resave(path, tmp_path / "bad.safetensors", **change)
    # drop the digest, so that each structural check is what catches its defect
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["xtoken_projection"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("digest")
    save_file(tensors, str(out), metadata={"xtoken_projection": json.dumps(meta)})
    with pytest.raises(ProjectionFileError, match=match) as e:
        Projection.load(out)
    assert str(out) in str(e.value) and isinstance(e.value, ValueError)


def test_foreign_and_non_safetensors_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    from xtoken.projection import ProjectionFileError

    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ProjectionFileError, match="no X-Token projection metadata"):
        Projection.load(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    with pytest.raises(ProjectionFileError, match="not a readable safetensors file"):
        Projection.load(junk)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(W_QWEN.read_bytes()[:4096])
    with pytest.raises(ProjectionFileError, match=str(truncated)):
        Projection.load(truncated)
