"""On-policy chat rows: the student answers the conversation in its own template and keeps its end-of-turn token,
so that the decision to stop is distilled (text rows drop every stop token: `xtoken.hf.onpolicy`).

    messages before the last assistant turn                       (`xtoken.hf.collator.chat_prompt`)
      -> student prompt ids   the student's template with the generation prompt, its specials as control tokens
      -> student.generate, cut at the first stop id                (`xtoken.hf.onpolicy.cut_at_stop`)
      -> that stop id KEPT when it ends a turn (a special token of role end_of_turn or end_of_text: Llama's
         <|eot_id|>, or eos), dropped otherwise (another special token mid-text, as for text rows)
      -> student row = prompt ids + generated ids (+ the kept stop id), never re-tokenized
      -> each teacher: prompt + [assistant: the decoded generation] rendered by its own template
         (`xtoken.chat.encode_chat`), its tokens up to the end of that content, then, when the student kept a stop
         id, the teacher's own token of the same role (Qwen3's <|im_end|> for <|eot_id|>; its end_of_text token
         for eos). W's row of the student's stop id must put all its weight on it (`xtoken.chat.check_end_of_turn`)
      -> chunk pairs: the generated content (`xtoken.align.align`), then the two stop tokens as one special chunk
      -> `DistillCollator.assemble` with these alignments, the prompt masked on every side (`mask_prompt`)

A generation that hits max_new_tokens (or max_length) before a stop id has no end-of-turn on any side: its content
is distilled, the decision to stop is not. A student that stops at once has one loss position, its end-of-turn.
A decoded generation that spells one of a teacher's special-token strings with ordinary tokens cannot be rendered
by that teacher's template: ValueError naming the row (as for such a string in the data).
"""

from __future__ import annotations

import numpy as np

from ..align import Alignment, align
from ..canonical import special_roles
from ..chat import END_ROLES, check_end_of_turn, encode_chat
from .collator import DistillCollator, _named
from .onpolicy import cut_at_stop, decode_generation, generate, mask_prompt, stop_ids


def end_roles(tok) -> dict[int, str]:
    """{id: role} of the special tokens of ``tok`` that end a turn (role end_of_turn or end_of_text)."""
    return {i: r for i, r in special_roles(tok).items() if r in END_ROLES}


def chat_prompt_ids(tok, messages: list[dict], max_length: int, name: str) -> list[int]:
    """The student's ids of ``messages`` rendered by its chat template with the generation prompt (the template
    writes BOS and its markers: no specials added, special strings tokenized as control tokens). Raises
    ValueError naming the row when it leaves no room to generate (more than ``max_length - 1`` tokens)."""
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    ids = list(tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    if not ids or len(ids) > max_length - 1:
        raise ValueError(
            f"row {name}: the chat prompt is {len(ids)} student tokens, but max_length={max_length} leaves room "
            f"for at most {max_length - 1} (one generated token at least); shorten the conversation or raise "
            "max_length (on-policy prompts are never truncated)"
        )
    return ids


def teacher_chat_row(tok, prompt: list[dict], text: str, stop_role: str | None, max_length: int, name: str):
    """One teacher's row of an on-policy chat answer: (ids, (first, end) of the answer's tokens, position of the
    appended end token or -1). ``stop_role``: the role of the student's kept stop id (None: it kept none); the
    appended token is the teacher's template end token when it has that role, else its first special token of
    that role (none: nothing appended)."""
    enc = _named(name, encode_chat, tok, [*prompt, {"role": "assistant", "content": text}], max_length)
    k = len(prompt)
    first, end = enc.content_tokens[k]
    ids = list(enc.input_ids[:end])
    if stop_role is None or enc.end_positions[k] < 0:  # no stop kept, or the teacher's turn was cut
        return ids, (first, end), -1
    template_end = enc.input_ids[enc.end_positions[k]]
    roles = end_roles(tok)
    if roles.get(template_end) != stop_role:
        template_end = min((i for i, r in roles.items() if r == stop_role), default=None)
    if template_end is None:
        return ids, (first, end), -1
    return ids + [int(template_end)], (first, end), end


def chat_alignment(s_row, s_start: int, n_content: int, t_row, t_content, t_end: int, s_tok, t_tok, projection):
    """Chunk pairs of one on-policy chat row: the student's generated content (positions s_start ..
    s_start + n_content) aligned with the teacher's answer tokens ``t_content`` = (first, end), then the student's
    kept stop id (position s_start + n_content, when the row has it) paired with the teacher's end token at
    ``t_end`` (-1: none; the student's stop is then unpaired). ``projection``: W, checked on that pair."""
    s_ids, t_ids = np.asarray(s_row, dtype=np.int64), np.asarray(t_row, dtype=np.int64)
    (ta, tb), sb = t_content, s_start + n_content
    s_spans, t_spans, special = [np.zeros((0, 2), np.int64)], [np.zeros((0, 2), np.int64)], [np.zeros(0, bool)]
    s_un, t_un = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if n_content and tb > ta:
        a = align(s_ids[s_start:sb], t_ids[ta:tb], s_tok, t_tok)
        s_spans.append(a.student_spans + s_start)
        t_spans.append(a.teacher_spans + ta)
        special.append(a.is_special)
        s_un.append(a.student_unpaired + s_start)
        t_un.append(a.teacher_unpaired + ta)
    else:
        s_un.append(np.arange(s_start, sb))
        t_un.append(np.arange(ta, tb))
    has_stop = len(s_ids) > sb
    if has_stop and t_end >= 0:
        if projection is not None:
            check_end_of_turn(projection, int(s_ids[sb]), int(t_ids[t_end]), s_tok, t_tok)
        s_spans.append(np.array([[sb, sb + 1]]))
        t_spans.append(np.array([[t_end, t_end + 1]]))
        special.append(np.ones(1, bool))
    elif has_stop:
        s_un.append(np.array([sb]))
    return Alignment(
        student_spans=np.concatenate(s_spans).astype(np.int64),
        teacher_spans=np.concatenate(t_spans).astype(np.int64),
        student_unpaired=np.sort(np.concatenate(s_un)).astype(np.int64),
        teacher_unpaired=np.sort(np.concatenate(t_un)).astype(np.int64),
        student_ids=s_ids,
        teacher_ids=t_ids,
        student_valid=(0, len(s_ids)),
        teacher_valid=(0, len(t_ids)),
        is_special=np.concatenate(special).astype(bool),
    )


def chat_on_policy_batch(model, collator: DistillCollator, prompts: list, names: list[str], idx, args):
    """The on-policy batch of chat rows (module docstring). ``prompts``: per row, the messages before its last
    assistant turn (as the collator prepared them). Returns (batch, generated lengths per row, the kept stop id
    included): the batch of `DistillCollator.assemble` with ``labels`` / ``kd_mask`` on the generated part and
    ``gen_start`` [B]."""
    tok = collator.student_tokenizer
    prompt_ids = [chat_prompt_ids(tok, p, collator.max_length, n) for p, n in zip(prompts, names)]
    budget = min(args.max_new_tokens, collator.max_length - min(len(p) for p in prompt_ids))
    raw = generate(model, tok, prompt_ids, budget, args)
    stops, limit, ends = stop_ids(tok), len(tok), end_roles(tok)
    contents, kept = [], []  # per row: the generated content ids, and the role of its kept stop id (or None)
    for g, p in zip(raw, prompt_ids):
        content = cut_at_stop(g, stops, limit)
        stop = g[len(content)] if len(content) < len(g) else None
        room = collator.max_length - len(p)
        kept.append(ends.get(stop) if len(content) < room else None)  # the stop id must fit in the row too
        contents.append(content[:room])
    student = [p + c + ([g[len(c)]] if role else []) for p, c, g, role in zip(prompt_ids, contents, raw, kept)]
    texts = [decode_generation(tok, p, c) for p, c in zip(prompt_ids, contents)]
    per_teacher, alignments = {}, {}
    for t in collator.teachers:
        if t.loss == "kl":
            per_teacher[t.name] = student
            continue
        W = t.projection if hasattr(t.projection, "indices") else None
        rows, aligned = [], []
        for b, (p, c, s_row) in enumerate(zip(prompt_ids, contents, student)):
            if t.tokenizer is tok:  # the student's own row: its content and stop id pair with themselves
                t_row, span, t_end = s_row, (len(p), len(p) + len(c)), (len(p) + len(c) if kept[b] else -1)
            else:
                t_row, span, t_end = teacher_chat_row(
                    t.tokenizer, prompts[b], texts[b], kept[b], collator.teacher_max_length, names[b]
                )
            rows.append(t_row)
            aligned.append(chat_alignment(s_row, len(p), len(c), t_row, span, t_end, tok, t.tokenizer, W))
        per_teacher[t.name], alignments[t.name] = rows, aligned
    batch = collator.assemble(student, per_teacher, idx, cached=False, memo=False, alignments=alignments)
    return mask_prompt(batch, [len(p) for p in prompt_ids]), [len(s) - len(p) for s, p in zip(student, prompt_ids)]
