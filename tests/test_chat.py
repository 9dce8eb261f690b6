"""Chat data (xtoken.chat): each side renders a conversation with its own template; the loss covers the assistant
contents and their end-of-turn tokens on every side, paired across tokenizers; bad input raises."""

import dataclasses

import numpy as np
import pytest
import torch

from xtoken import Projection, build_projection, load_tokenizer
from xtoken.align import byte_table
from xtoken.chat import (
    CHAT_TEMPLATES,
    TEMPLATE_TOKENS,
    align_chat,
    aligned_chat_table,
    chat_loss_mask,
    check_end_of_turn,
    encode_chat,
    render_chat,
    with_chat_template,
)
from xtoken.projection import SPECIAL

FAMILIES = ("llama", "qwen3", "phi")
END_OF_TURN = {"llama": ("<|eot_id|>", 128009), "qwen3": ("<|im_end|>", 151645), "phi": ("<|end|>", 200020)}
W_FILES = {
    "qwen3": "results/W_Llama-3.2-1B_to_Qwen3-4B.safetensors",
    "phi": "results/W_Llama-3.2-1B_to_Phi-4-mini-instruct.safetensors",
}

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 12+30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "Spell it, naïvely."},
    {"role": "assistant", "content": "Forty-two."},
]
EXPECTED = {
    "llama": "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 12+30?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n12 + 30 = 42.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nSpell it, naïvely.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nForty-two.<|eot_id|>",
    "qwen3": "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n"
    "<|im_start|>assistant\n12 + 30 = 42.<|im_end|>\n"
    "<|im_start|>user\nSpell it, naïvely.<|im_end|>\n"
    "<|im_start|>assistant\nForty-two.<|im_end|>\n",
    "phi": "<|system|>You are a terse assistant.<|end|>"
    "<|user|>What is 12+30?<|end|>"
    "<|assistant|>12 + 30 = 42.<|end|>"
    "<|user|>Spell it, naïvely.<|end|>"
    "<|assistant|>Forty-two.<|end|>",
}


def bare(family: str):
    """A fresh tokenizer without a chat template (the offline rebuilds carry none; one read from a local Hugging Face
    cache would bring its official template, cleared here so that the documented formats are what is tested)."""
    tok = load_tokenizer(family)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def toks():
    """Fresh tokenizers (the shared conftest fixtures stay without a chat template), each with its family's template."""
    return {f: with_chat_template(bare(f), f) for f in FAMILIES}


def test_template_special_tokens_exist_in_the_real_vocabularies(toks):
    for family, tokens in TEMPLATE_TOKENS.items():
        tok = toks[family]
        specials = set(tok.all_special_tokens) | {a.content for a in tok.added_tokens_decoder.values() if a.special}
        for s in tokens:
            assert s in specials, (family, s)
            assert tok(s, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(s)]
        eot, eot_id = END_OF_TURN[family]
        assert tok.convert_tokens_to_ids(eot) == eot_id


@pytest.mark.parametrize("family", FAMILIES)
def test_rendering_matches_the_documented_format(toks, family):
    r = render_chat(toks[family], MESSAGES)
    assert r.text == EXPECTED[family]
    assert toks[family].apply_chat_template(MESSAGES, tokenize=False) == EXPECTED[family]
    assert [r.text[a:b] for a, b in r.content_spans] == [m["content"] for m in MESSAGES]
    eot = END_OF_TURN[family][0]
    assert [r.text[a:b] for a, b in r.loss_spans] == ["12 + 30 = 42." + eot, "Forty-two." + eot]
    assert r.end_tokens == (eot,) * 5
    # the excluded parts and the loss spans tile the text, in order
    parts = sorted([(a, b) for a, b, _ in r.excluded_spans] + r.loss_spans)
    assert parts[0][0] == 0 and parts[-1][1] == len(r.text)
    assert all(b == a2 for (_, b), (a2, _) in zip(parts, parts[1:]))
    kinds = {kind: r.text[a:b] for a, b, kind in r.excluded_spans if kind in ("system", "user")}
    assert kinds["system"] == "You are a terse assistant."
    gen = toks[family].apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert EXPECTED[family].startswith(gen)  # the generation prompt is the next assistant header


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_mask_is_exactly_the_assistant_contents_and_end_of_turn(toks, family):
    tok = toks[family]
    r = render_chat(tok, MESSAGES)
    mask = chat_loss_mask(tok, r)
    enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    assert mask.dtype == torch.bool and mask.shape == (len(ids),)
    # masked tokens, decoded run by run, are the assistant turns' contents each followed by its end-of-turn token
    runs, run = [], []
    for i, m in zip(ids, mask.tolist()):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    eot, eot_id = END_OF_TURN[family]
    assert [tok.decode(x) for x in runs] == ["12 + 30 = 42." + eot, "Forty-two." + eot]
    assert [x[-1] for x in runs] == [eot_id, eot_id]
    # no system or user character, no header, is in a masked token; every end token of a prompt turn is out
    for (a, b), m in zip(enc["offset_mapping"], mask.tolist()):
        if m:
            assert any(lo <= a and b <= hi for lo, hi in r.loss_spans)
    unmasked = tok.decode([i for i, m in zip(ids, mask.tolist()) if not m])
    for m in MESSAGES[:2] + MESSAGES[3:4]:
        assert m["content"] in unmasked
    assert sum(i == eot_id for i, m in zip(ids, mask.tolist()) if not m) == 3  # system, user, user


def test_a_content_starting_with_a_newline_keeps_its_straddling_token(toks):
    tok = toks["llama"]  # "\n\n" of the header + "\n" of the content come out as one token
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    r = render_chat(tok, msgs)
    enc = encode_chat(tok, r)
    masked = tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask.tolist()) if m])
    assert masked.endswith("\nHello<|eot_id|>") and set(masked[: -len("\nHello<|eot_id|>")]) <= {"\n"}


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_pairing_rule_has_one_token_per_family(toks, family):
    """W pairs specials by role (`build_projection`: the teacher's first id of the role); each family has exactly
    one end_of_turn special, its template's end-of-turn token."""
    from xtoken.canonical import special_roles

    ids = [i for i, role in special_roles(toks[family]).items() if role == "end_of_turn"]
    assert ids == [END_OF_TURN[family][1]]


@pytest.mark.parametrize("teacher", ["qwen3", "phi"])
def test_committed_w_pairs_llamas_end_of_turn_with_the_teachers(toks, teacher):
    W = Projection.load(W_FILES[teacher], toks["llama"], toks[teacher])
    s, t = END_OF_TURN["llama"][1], END_OF_TURN[teacher][1]
    assert int(W.row_kind[s]) == SPECIAL
    assert W.indices[s, 0] == t and W.weights[s, 0] == 1.0 and (W.indices[s, 1:] == -1).all()
    check_end_of_turn(W, s, t, toks["llama"], toks[teacher])


@pytest.mark.parametrize("student,teacher", [("qwen3", "llama"), ("phi", "qwen3")])
def test_a_freshly_built_w_pairs_the_end_of_turn_tokens(toks, student, teacher):
    W = build_projection(toks[student], toks[teacher])
    s, t = END_OF_TURN[student][1], END_OF_TURN[teacher][1]
    assert int(W.row_kind[s]) == SPECIAL and W.indices[s, 0] == t
    check_end_of_turn(W, s, t, toks[student], toks[teacher])


@pytest.mark.parametrize("teacher", ["qwen3", "phi"])
def test_align_chat_pairs_the_assistant_turns_only(toks, teacher):
    s_tok, t_tok = toks["llama"], toks[teacher]
    W = Projection.load(W_FILES[teacher], s_tok, t_tok)
    s, t = encode_chat(s_tok, MESSAGES), encode_chat(t_tok, MESSAGES)
    a = align_chat(s, t, s_tok, t_tok, projection=W)
    assert len(a.student_unpaired) == 0 and len(a.teacher_unpaired) == 0
    assert a.predictable.all()
    # every chunk lies in the loss on both sides, and every loss position is in exactly one chunk
    s_cover, t_cover = np.zeros(len(s.input_ids), int), np.zeros(len(t.input_ids), int)
    for (a0, b0), (c0, d0) in zip(a.student_spans, a.teacher_spans):
        s_cover[a0:b0] += 1
        t_cover[c0:d0] += 1
    assert (s_cover == s.loss_mask.numpy()).all() and (t_cover == t.loss_mask.numpy()).all()
    # text chunks spell the same bytes; the special chunks are the end-of-turn pairs
    sb, tb = byte_table(s_tok), byte_table(t_tok)
    for k in np.flatnonzero(~a.is_special):
        x, y = a.chunk_bytes(k, s_tok, t_tok)
        assert x == y and x
    pairs = [
        (int(a.student_ids[a0]), int(a.teacher_ids[c0]))
        for (a0, _), (c0, _) in zip(a.student_spans[a.is_special], a.teacher_spans[a.is_special])
    ]
    assert pairs == [(END_OF_TURN["llama"][1], END_OF_TURN[teacher][1])] * 2
    assert sb.role[pairs[0][0]] == tb.role[pairs[0][1]] == "end_of_turn"


def test_align_chat_refuses_a_w_that_does_not_pair_end_of_turn(toks):
    s_tok, t_tok = toks["llama"], toks["qwen3"]
    W = Projection.load(W_FILES["qwen3"], s_tok, t_tok)
    indices, kind = W.indices.clone(), W.row_kind.clone()
    indices[128009, 0] = 151643  # <|endoftext|>: W would compare "stop the turn" with "end of the document"
    bad = dataclasses.replace(W, indices=indices, row_kind=kind)
    s, t = encode_chat(s_tok, MESSAGES), encode_chat(t_tok, MESSAGES)
    with pytest.raises(ValueError, match=r"does not pair the end-of-turn.*<\|eot_id\|>.*<\|im_end\|>"):
        align_chat(s, t, s_tok, t_tok, projection=bad)


def test_align_chat_refuses_two_different_conversations(toks):
    other = [dict(m) for m in MESSAGES]
    other[2]["content"] = "42."
    s, t = encode_chat(toks["llama"], MESSAGES), encode_chat(toks["qwen3"], other)
    with pytest.raises(ValueError, match="not the same conversation"):
        align_chat(s, t, toks["llama"], toks["qwen3"])


def test_truncation_drops_the_cut_end_of_turn_pair(toks):
    s_tok, t_tok = toks["llama"], toks["qwen3"]
    full = encode_chat(s_tok, MESSAGES)
    cut = encode_chat(s_tok, MESSAGES, max_length=full.end_positions[-1])  # the last <|eot_id|> is cut away
    assert len(cut.input_ids) == len(cut.loss_mask) == full.end_positions[-1]
    a = align_chat(cut, encode_chat(t_tok, MESSAGES), s_tok, t_tok)
    assert a.is_special.sum() == 1  # only the first turn's end-of-turn pair
    assert a.teacher_unpaired.tolist() == [encode_chat(t_tok, MESSAGES).end_positions[-1]]


def test_aligned_chat_table_shows_one_conversation_across_three_templates(toks):
    table = aligned_chat_table(MESSAGES, toks["llama"], {"qwen3": toks["qwen3"], "phi": toks["phi"]})
    assert list(table.columns) == ["message", "role", "part", "in_loss", "student", "qwen3", "phi"]
    loss = table[table.in_loss]
    assert set(loss.role) == {"assistant"} and set(loss.part) == {"content", "end_of_turn"}
    eots = loss[loss.part == "end_of_turn"]
    assert eots[["student", "qwen3", "phi"]].values.tolist() == [["'<|eot_id|>'", "'<|im_end|>'", "'<|end|>'"]] * 2
    assert "'4' '2'" in loss.qwen3.tolist() and "'42'" in loss.student.tolist()  # digits packed vs split
    assert not table[table.role.isin(["system", "user"])].in_loss.any()
    only = aligned_chat_table(MESSAGES, toks["llama"], {"qwen3": toks["qwen3"]}, include_prompts=False)
    assert set(only.role) == {"assistant"}


# ---- bad input ---------------------------------------------------------------------------------------------


def test_a_tokenizer_without_a_chat_template_is_named():
    tok = bare("qwen3")
    with pytest.raises(ValueError, match=r"'Qwen/Qwen3-4B' has no chat template.*with_chat_template"):
        render_chat(tok, MESSAGES)


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "no messages"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'tool'"),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "y"}], "NoneType content"),
        ([{"role": "user"}, {"role": "assistant", "content": "y"}], "must be a dict with 'role' and 'content'"),
        ("hello", "must be a list"),
    ],
)
def test_bad_conversations_raise(toks, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(toks["phi"], messages)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_special_token_string_in_a_content_raises(toks, family):
    eot = END_OF_TURN[family][0]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"bye{eot} and more"}]
    with pytest.raises(ValueError, match=r"message 1 \(assistant\) contains .*special token"):
        render_chat(toks[family], msgs)
    msgs = [{"role": "user", "content": f"say {eot}"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match=r"message 0 \(user\) contains"):
        render_chat(toks[family], msgs)
    other = END_OF_TURN["qwen3" if family != "qwen3" else "llama"][0]  # another family's marker is plain text
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"the token {other}"}]
    assert render_chat(toks[family], msgs).contents[1] == f"the token {other}"


def test_with_chat_template_keeps_an_existing_template_and_refuses_a_wrong_family():
    tok = bare("qwen3")
    with pytest.raises(ValueError, match=r"writes \['<\|begin_of_text\|>'.*no special token"):
        with_chat_template(tok, "llama")
    with pytest.raises(ValueError, match="no chat template for 'mistral'"):
        with_chat_template(tok, "mistral")
    assert with_chat_template(tok, "Qwen/Qwen3-4B").chat_template == CHAT_TEMPLATES["qwen3"]
    own = "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{%- endfor %}"
    tok.chat_template = own
    assert with_chat_template(tok, "qwen3").chat_template == own


def _with(tok, template):
    tok.chat_template = template
    return tok


def test_templates_that_trim_are_located_and_those_that_rewrite_or_drop_raise():
    tok = bare("qwen3")
    trim = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}"
        "{%- endfor %}"
    )
    r = render_chat(_with(tok, trim), [{"role": "user", "content": " hi "}, {"role": "assistant", "content": " ok \n"}])
    assert r.contents == ("hi", "ok") and r.loss_spans == [(r.text.index("ok"), r.text.index("ok") + 12)]
    upper = trim.replace("| trim", "| upper")
    with pytest.raises(ValueError, match="rewrites message contents"):
        render_chat(_with(tok, upper), MESSAGES)
    drop = (
        "{%- for m in messages if m['role'] != 'system' %}{{- '<|im_start|>' + m['content'] + '<|im_end|>' }}"
        "{%- endfor %}"
    )
    with pytest.raises(ValueError, match=r"does not write message 0 \(system\) exactly once"):
        render_chat(_with(tok, drop), MESSAGES)
    no_end = "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{%- endfor %}"
    with pytest.raises(ValueError, match=r"assistant message 2 is not followed by an end-of-turn token"):
        render_chat(_with(tok, no_end), MESSAGES)


def test_labels_and_kd_mask_follow_the_loss_mask(toks):
    enc = encode_chat(toks["llama"], MESSAGES)
    ids, mask = torch.tensor(enc.input_ids), enc.loss_mask
    assert (enc.labels[mask] == ids[mask]).all() and (enc.labels[~mask] == -100).all()
    assert enc.kd_mask[:-1].bool().tolist() == mask[1:].tolist() and enc.kd_mask[-1] == 0
