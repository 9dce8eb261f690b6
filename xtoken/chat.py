"""Chat data for cross-tokenizer distillation: each side renders a conversation with its own chat template.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``. The
student and every teacher render it with their own template, so no two sides see the same text; what they
share is the assistant contents (identical strings) and the fact that each assistant turn ends with that
side's end-of-turn token. The loss covers exactly those: each assistant turn's content tokens and its
end-of-turn token, on every side; system and user turns and the template's own text (headers, role markers,
BOS, newlines) are context only.

    Llama-3   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
              <|start_header_id|>assistant<|end_header_id|>\\n\\n[Hello!<|eot_id|>]
    Qwen3     <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[Hello!<|im_end|>]\\n
    Phi-4     <|user|>Hi<|end|><|assistant|>[Hello!<|end|>]
                                           [...] = the loss (`RenderedChat.loss_spans`)

Templates (`CHAT_TEMPLATES`, set with `with_chat_template`). The paper's tokenizers are rebuilt offline
(`xtoken.tokenizers`) and carry no chat template, so this module ships the three formats, written from the
public model cards (every special token checked against the real vocabularies in tests/test_chat.py):

    "llama"  (Meta Llama 3 / 3.2 Instruct model cards)
             <|begin_of_text|> then per message  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
             generation prompt                  <|start_header_id|>assistant<|end_header_id|>\\n\\n
    "qwen3"  (Qwen3 model card, ChatML)
             per message  <|im_start|>{role}\\n{content}<|im_end|>\\n
             generation prompt  <|im_start|>assistant\\n
    "phi"    (Phi-4-mini-instruct model card, "Chat format")
             per message  <|{role}|>{content}<|end|>
             generation prompt  <|assistant|>

Contents are inserted as given. The official templates do more: Llama's trim each content and (3.1, 3.2)
add a system header with knowledge-cutoff dates; Qwen3's render tool calls and ``<think>`` blocks; Phi-4's
appends ``<|endoftext|>`` after the last message and renders tools. A tokenizer that has its own template
keeps it (`with_chat_template` never overwrites one): `render_chat` locates the contents in any template's
output, provided the template inserts each content once, unchanged or trimmed.

Alignment is per message (`align_chat`): the contents of message k on two sides are the same string, so
`xtoken.align.align` pairs their tokens; each assistant turn's end-of-turn tokens are then paired with each
other, whatever their roles. W pairs them too: `xtoken.canonical.special_roles` gives ``<|eot_id|>``,
``<|im_end|>`` and ``<|end|>`` the role ``end_of_turn``, and `build_projection` gives each such student row
SPECIAL kind, weight 1 on the teacher's ``end_of_turn`` id (the committed results/W_*.safetensors:
Llama 128009 -> Qwen3 151645, Llama 128009 -> Phi-4 200020). With a ``projection``, `align_chat` checks
that row and raises if W sends the student's end-of-turn anywhere else: the student would otherwise never
be taught by the teacher to stop.

Bad input raises `ValueError` naming the tokenizer (never a silent zero loss): no chat template on one
side, no messages or no assistant turn, an unknown role or a non-string content, a content holding one of
the tokenizer's special-token strings (it would become a control token and change the turn structure: the
check covers every role), a template that drops, repeats or rewrites a content, or an assistant turn not
followed by an end-of-turn token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .align import Alignment, align
from .canonical import special_roles

__all__ = [
    "CHAT_TEMPLATES",
    "ChatEncoding",
    "RenderedChat",
    "align_chat",
    "aligned_chat_table",
    "chat_loss_mask",
    "check_end_of_turn",
    "encode_chat",
    "render_chat",
    "with_chat_template",
]

ROLES = ("system", "user", "assistant")
_ROLE_CHECK = (
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}{%- endif %}"
)
CHAT_TEMPLATES = {
    "llama": (
        "{{- '<|begin_of_text|>' }}{%- for message in messages %}" + _ROLE_CHECK + "{{- '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "qwen3": (
        "{%- for message in messages %}" + _ROLE_CHECK + "{{- '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "phi": (
        "{%- for message in messages %}" + _ROLE_CHECK + "{{- '<|' + message['role'] + '|>' + message['content'] + "
        "'<|end|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
    ),
}
# the special tokens each template writes (each must be a special token of the tokenizer it is set on)
TEMPLATE_TOKENS = {
    "llama": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>"),
    "phi": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
}
_FAMILY_OF_SPEC = {"llama3": "llama", "qwen3": "qwen3", "o200k": "phi"}  # xtoken.tokenizers spec families
END_ROLES = ("end_of_turn", "end_of_text")  # roles a special token ending an assistant turn may have


def _name(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def _family(family: str) -> str:
    if family in CHAT_TEMPLATES:
        return family
    from .tokenizers import PAPER_TOKENIZERS, resolve_name

    spec = PAPER_TOKENIZERS.get(resolve_name(family))
    if spec is None:
        raise ValueError(
            f"no chat template for {family!r}: the templates are {sorted(CHAT_TEMPLATES)} (or one of the paper's "
            "model names); for another model, set tokenizer.chat_template yourself"
        )
    return _FAMILY_OF_SPEC[spec.family]


def with_chat_template(tok, family: str):
    """``tok`` with the chat template of ``family`` ("llama", "qwen3", "phi", or a name `load_tokenizer` knows),
    set in place, and returned. A tokenizer that already has a template keeps its own (returned unchanged).

    Raises ValueError for an unknown family, or when ``tok`` lacks a special token the template writes (the
    Llama template on Qwen3's tokenizer, say: its markers would be tokenized as plain text)."""
    family = _family(family)
    if getattr(tok, "chat_template", None):
        return tok
    specials = set(_special_strings(tok))
    missing = [s for s in TEMPLATE_TOKENS[family] if s not in specials]
    if missing:
        raise ValueError(
            f"the {family!r} chat template writes {missing}, which tokenizer {_name(tok)!r} has no special token "
            "for: pick the template of this tokenizer's own family"
        )
    tok.chat_template = CHAT_TEMPLATES[family]
    return tok


# ---- rendering --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered by one tokenizer's chat template, with the character spans of its parts.

    ``text``: the rendered string. Per message k (in the order given): ``roles[k]``, ``contents[k]`` (the
    content as the template wrote it: as given, or trimmed), ``content_spans[k]`` = (start, end) characters
    of the content in ``text``, and ``end_spans[k]`` = (start, end) of the special token right after the
    content when it ends a turn (role end_of_turn / end_of_text; always present for assistant turns), else
    None. ``end_tokens[k]``: that token's string (``"<|eot_id|>"``), or None."""

    text: str
    tokenizer: str
    roles: tuple
    contents: tuple
    content_spans: tuple
    end_spans: tuple
    end_tokens: tuple

    @property
    def assistant_turns(self) -> list[int]:
        """Indices of the assistant messages."""
        return [k for k, r in enumerate(self.roles) if r == "assistant"]

    @property
    def loss_spans(self) -> list[tuple[int, int]]:
        """[(start, end)] characters of each assistant turn's content and its end-of-turn token (adjacent)."""
        return [(self.content_spans[k][0], self.end_spans[k][1]) for k in self.assistant_turns]

    @property
    def excluded_spans(self) -> list[tuple[int, int, str]]:
        """[(start, end, kind)] of the text outside the loss, in order, non-empty: kind "system" / "user" (that
        turn's content), "end_of_turn" (a system or user turn's end token) or "template" (headers, role markers,
        BOS, separators)."""
        parts = []
        for k, role in enumerate(self.roles):
            if role != "assistant":
                parts.append((*self.content_spans[k], role))
                if self.end_spans[k] is not None:
                    parts.append((*self.end_spans[k], "end_of_turn"))
        parts = [p for p in parts if p[1] > p[0]]
        taken = sorted([(a, b) for a, b, _ in parts] + self.loss_spans)
        at = 0
        for a, b in taken:
            if a > at:
                parts.append((at, a, "template"))
            at = max(at, b)
        if at < len(self.text):
            parts.append((at, len(self.text), "template"))
        return sorted(parts)


def _special_strings(tok) -> dict[str, int]:
    """Every special token's string -> its id (memoized on the tokenizer)."""
    cached = getattr(tok, "_xtoken_chat_specials", None)
    if cached is None:
        cached = {tok.convert_ids_to_tokens(i): i for i in special_roles(tok)}
        try:
            tok._xtoken_chat_specials = cached
        except AttributeError:  # pragma: no cover - exotic tokenizer classes
            pass
    return cached


def _special_pattern(tok) -> re.Pattern:
    strings = sorted(_special_strings(tok), key=len, reverse=True)  # longest first: '<|end|>' vs '<|endof...'
    return re.compile("|".join(map(re.escape, strings)) if strings else r"(?!)")


def _check_messages(messages, name: str) -> list[tuple[str, str]]:
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__len__"):
        raise ValueError(
            f"{name}: messages must be a list of {{'role', 'content'}} dicts, not {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError(f"{name}: the conversation has no messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{name}: message {k} must be a dict with 'role' and 'content', not {m!r:.120}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"{name}: message {k} has the unknown role {role!r}: roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{name}: message {k} ({role}) has a {type(content).__name__} content: it must be a str")
        out.append((role, content))
    if not any(r == "assistant" for r, _ in out):
        raise ValueError(f"{name}: the conversation has no assistant turn, so nothing to train on")
    return out


def render_chat(tok, messages) -> RenderedChat:
    """Render ``messages`` with ``tok.apply_chat_template(..., tokenize=False)`` and locate every part.

    The contents are located exactly: the conversation is rendered a second time with each content replaced
    by a unique placeholder, the placeholders are found (each must occur exactly once, in order), and the
    text rebuilt from that skeleton with the contents must equal the real rendering (with the contents as
    given, else trimmed). Returns a `RenderedChat`. Raises ValueError (see the module docstring)."""
    name = _name(tok)
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"tokenizer {name!r} has no chat template: set one with xtoken.chat.with_chat_template(tok, family) "
            f"(families {sorted(CHAT_TEMPLATES)}) or tok.chat_template = '...'"
        )
    msgs = _check_messages(messages, name)
    pattern = _special_pattern(tok)
    for k, (role, content) in enumerate(msgs):
        hit = pattern.search(content)
        if hit:
            raise ValueError(
                f"{name}: message {k} ({role}) contains {hit.group()!r}, a special token of this tokenizer: it "
                "would be tokenized as a control token and change the conversation's structure; remove or "
                "escape it in the data"
            )
    render = lambda contents: tok.apply_chat_template(  # noqa: E731
        [{"role": r, "content": c} for (r, _), c in zip(msgs, contents)], tokenize=False
    )
    text = render([c for _, c in msgs])
    marks = [f"\ue000{k}\ue001" for k in range(len(msgs))]  # private-use characters and digits: no case
    skeleton = render(marks)
    pieces, at = [], 0
    for k, mark in enumerate(marks):
        pos = skeleton.find(mark, at)
        if pos < 0 or skeleton.count(mark) != 1:
            raise ValueError(
                f"{name}: its chat template does not write message {k} ({msgs[k][0]}) exactly once, in order: "
                "the turns cannot be located in its output"
            )
        pieces.append(skeleton[at:pos])
        at = pos + len(mark)
    for contents in ([c for _, c in msgs], [c.strip() for _, c in msgs]):
        spans, rebuilt = [], ""
        for piece, content in zip(pieces, contents):
            rebuilt += piece
            spans.append((len(rebuilt), len(rebuilt) + len(content)))
            rebuilt += content
        if rebuilt + skeleton[at:] == text:
            break
    else:
        raise ValueError(
            f"{name}: its chat template rewrites message contents (beyond trimming whitespace), so the assistant "
            "turns cannot be located in its output; use a template that inserts each content as given"
        )
    roles = special_roles(tok)
    ids = _special_strings(tok)
    end_spans, end_tokens = [], []
    for k, (role, _) in enumerate(msgs):
        hit = pattern.match(text, spans[k][1])
        if hit and roles.get(ids[hit.group()]) in END_ROLES:
            end_spans.append(hit.span())
            end_tokens.append(hit.group())
        elif role == "assistant":
            after = repr(text[spans[k][1] : spans[k][1] + 20])
            raise ValueError(
                f"{name}: assistant message {k} is not followed by an end-of-turn token in its chat template (it is "
                f"followed by {after}): the student could not learn to end a turn; use a template that closes "
                f"each turn with one (a special token of role {' or '.join(END_ROLES)})"
            )
        else:
            end_spans.append(None)
            end_tokens.append(None)
    return RenderedChat(
        text=text,
        tokenizer=name,
        roles=tuple(r for r, _ in msgs),
        contents=tuple(text[a:b] for a, b in spans),
        content_spans=tuple(spans),
        end_spans=tuple(end_spans),
        end_tokens=tuple(end_tokens),
    )


# ---- tokens and the loss mask ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatEncoding:
    """One side's tokens of a rendered conversation.

    ``input_ids``: [n] the ids of ``tok(rendered.text, add_special_tokens=False)`` (the template writes BOS
    itself), cut to ``max_length``. ``loss_mask``: [n] bool, True on the assistant turns' content tokens and
    end-of-turn tokens (what `chat_loss_mask` returns). Per message k: ``content_tokens[k]`` = (first, end)
    token positions of its content (the tokens sharing a character with it; (p, p) when it has none, or
    when truncation cut it away), ``end_positions[k]``: the position of its end token, or -1 (none, or cut)."""

    rendered: RenderedChat
    input_ids: list
    loss_mask: torch.Tensor
    content_tokens: tuple
    end_positions: tuple

    @property
    def labels(self) -> torch.Tensor:
        """[n] int64: the ids on loss positions, -100 elsewhere (the student's CE on the assistant turns only)."""
        return torch.tensor(self.input_ids, dtype=torch.long).masked_fill(~self.loss_mask, -100)

    @property
    def kd_mask(self) -> torch.Tensor:
        """[n] int64: 1 on the logits that predict a loss position (logit p predicts token p + 1), as the
        trainer's ``kd_mask`` reads it (a same-tokenizer 'kl' teacher)."""
        out = torch.zeros(len(self.input_ids), dtype=torch.long)
        out[:-1] = self.loss_mask[1:].long()
        return out


def encode_chat(tok, chat, max_length: int | None = None) -> ChatEncoding:
    """Tokenize a conversation (``messages``, or a `RenderedChat` of ``tok``) and mark its loss positions.

    Tokens come from ``tok(text, add_special_tokens=False, return_offsets_mapping=True)``; a token is in the
    loss when it shares a character with a loss span (`RenderedChat.loss_spans`), so a token that straddles
    the start of a content (a content starting with a newline, merged with the template's own) is trained
    on: it must be predicted for the content to come out. ``max_length``: keep the first max_length tokens.
    Returns a `ChatEncoding`. Raises ValueError when an end-of-turn token does not come out as its single
    special token (a tokenizer that splits special tokens)."""
    rendered = chat if isinstance(chat, RenderedChat) else render_chat(tok, chat)
    if rendered.tokenizer != _name(tok):
        raise ValueError(f"the conversation was rendered by {rendered.tokenizer!r}, not by {_name(tok)!r}")
    enc = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids = list(enc["input_ids"])
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in rendered.loss_spans:
        mask |= (starts < b) & (ends > a) & (ends > starts)
    content_tokens, end_positions = [], []
    special = _special_strings(tok)
    for k, (a, b) in enumerate(rendered.content_spans):
        inside = np.flatnonzero((starts < b) & (ends > a) & (ends > starts))
        first = int(np.searchsorted(starts, a)) if not len(inside) else int(inside[0])
        content_tokens.append((first, int(inside[-1]) + 1 if len(inside) else first))
        span = rendered.end_spans[k]
        if span is None:
            end_positions.append(-1)
            continue
        pos = np.flatnonzero((starts == span[0]) & (ends == span[1]))
        if not len(pos) or ids[int(pos[0])] != special[rendered.end_tokens[k]]:
            raise ValueError(
                f"{_name(tok)}: the end token {rendered.end_tokens[k]!r} of message {k} is not tokenized as its "
                "special token: tokenize special-token strings as control tokens (split_special_tokens=False)"
            )
        end_positions.append(int(pos[0]))
    if max_length is not None:
        n = max(0, int(max_length))
        ids, mask = ids[:n], mask[:n]
        content_tokens = [(min(a, n), min(b, n)) for a, b in content_tokens]
        end_positions = [p if p < n else -1 for p in end_positions]
    return ChatEncoding(rendered, ids, torch.from_numpy(mask), tuple(content_tokens), tuple(end_positions))


def chat_loss_mask(tok, rendered: RenderedChat) -> torch.Tensor:
    """[n_tokens] bool over ``tok(rendered.text, add_special_tokens=False)``: True exactly on the assistant
    turns' content tokens and their end-of-turn tokens (see `encode_chat`)."""
    return encode_chat(tok, rendered).loss_mask


# ---- alignment across templates ----------------------------------------------------------------------------


def check_end_of_turn(projection, student_id: int, teacher_id: int, student_tok, teacher_tok) -> None:
    """Raise ValueError unless W's row of the student's end-of-turn id ``student_id`` puts all its weight on
    the teacher's end-of-turn id ``teacher_id`` (a SPECIAL row, as `build_projection` makes for tokens of the
    same role): otherwise the projected student probability of ending the turn is not compared with the
    teacher's."""
    row = projection.indices[int(student_id)].tolist()
    weight = projection.weights[int(student_id)].tolist()
    mass = sum(w for i, w in zip(row, weight) if i == int(teacher_id))
    if abs(mass - 1.0) > 1e-4:
        sent = {teacher_tok.convert_ids_to_tokens(int(i)): round(float(w), 4) for i, w in zip(row, weight) if i >= 0}
        s_name, t_name = (
            student_tok.convert_ids_to_tokens(int(student_id)),
            teacher_tok.convert_ids_to_tokens(int(teacher_id)),
        )
        raise ValueError(
            f"W does not pair the end-of-turn tokens: the student's {s_name!r} ({int(student_id)}) has weight "
            f"{mass:.4f} on the teacher's {t_name!r} ({int(teacher_id)}); its row is {sent or 'empty'}. Give both "
            "tokens the same role in xtoken.canonical.KNOWN_ROLES and rebuild W"
        )


def align_chat(
    student: ChatEncoding,
    teacher: ChatEncoding,
    student_tok,
    teacher_tok,
    *,
    projection=None,
    window: int = 32,
    agree_bytes: int = 16,
) -> Alignment:
    """Chunk pairs of one conversation rendered by two templates, over the loss positions only.

    Per assistant turn: its content tokens on both sides are aligned (`xtoken.align.align`: the contents are
    the same string), then its end-of-turn tokens are paired as one special chunk (``is_special``), whatever
    their roles. Prompts and template text get no chunk and are not listed as unpaired (unpaired positions:
    loss positions of either side in no chunk). Positions index ``student.input_ids`` and
    ``teacher.input_ids``; valid regions are the whole rows. ``projection`` (a `Projection` student -> teacher,
    optional): checked with `check_end_of_turn` for every paired end-of-turn.

    Returns an `xtoken.align.Alignment`. Raises ValueError when the two encodings are not the same
    conversation (different roles or contents)."""
    s_r, t_r = student.rendered, teacher.rendered
    s_contents = [s_r.contents[k] for k in s_r.assistant_turns]
    if s_r.roles != t_r.roles or s_contents != [t_r.contents[k] for k in t_r.assistant_turns]:
        raise ValueError(
            f"the student ({s_r.tokenizer}) and teacher ({t_r.tokenizer}) encodings are not the same conversation: "
            "their roles or assistant contents differ (one template trims contents, the other not, or the rows "
            "were mixed up)"
        )
    s_ids, t_ids = np.asarray(student.input_ids, dtype=np.int64), np.asarray(teacher.input_ids, dtype=np.int64)
    s_spans, t_spans, special, s_un, t_un = [], [], [], [], []
    checked = set()
    for k in s_r.assistant_turns:
        (sa, sb), (ta, tb) = student.content_tokens[k], teacher.content_tokens[k]
        if sb > sa and tb > ta:
            a = align(s_ids[sa:sb], t_ids[ta:tb], student_tok, teacher_tok, window=window, agree_bytes=agree_bytes)
            s_spans.append(a.student_spans + sa)
            t_spans.append(a.teacher_spans + ta)
            special.append(a.is_special)
            s_un.append(a.student_unpaired + sa)
            t_un.append(a.teacher_unpaired + ta)
        else:  # one side's content cut away (truncation): the other side's tokens are unpaired
            s_un.append(np.arange(sa, sb))
            t_un.append(np.arange(ta, tb))
        se, te = student.end_positions[k], teacher.end_positions[k]
        if se >= 0 and te >= 0:
            pair = (int(s_ids[se]), int(t_ids[te]))
            if projection is not None and pair not in checked:
                check_end_of_turn(projection, *pair, student_tok, teacher_tok)
                checked.add(pair)
            s_spans.append(np.array([[se, se + 1]]))
            t_spans.append(np.array([[te, te + 1]]))
            special.append(np.ones(1, dtype=bool))
        else:
            s_un.append(np.array([se] if se >= 0 else []))
            t_un.append(np.array([te] if te >= 0 else []))
    cat = lambda xs, shape: np.concatenate(xs).astype(np.int64) if xs else np.zeros(shape, dtype=np.int64)  # noqa: E731
    return Alignment(
        student_spans=cat(s_spans, (0, 2)).reshape(-1, 2),
        teacher_spans=cat(t_spans, (0, 2)).reshape(-1, 2),
        student_unpaired=np.sort(cat(s_un, 0)),
        teacher_unpaired=np.sort(cat(t_un, 0)),
        student_ids=s_ids,
        teacher_ids=t_ids,
        student_valid=(0, len(s_ids)),
        teacher_valid=(0, len(t_ids)),
        is_special=np.concatenate(special).astype(bool) if special else np.zeros(0, dtype=bool),
    )


# ---- a readable table ------------------------------------------------------------------------------------


def _show(tok, ids) -> str:
    """Tokens as their decoded strings, quoted, side by side: ``'Hello' ',' ' world'``."""
    return " ".join(repr(tok.decode([int(i)])) for i in ids)


def aligned_chat_table(messages, student_tok, teacher_toks: dict, include_prompts: bool = True):
    """One conversation as every side tokenizes it, side by side: a `pandas.DataFrame` with one row per part.

    Columns: ``message`` (index), ``role``, ``part`` ("template": the text before the content, headers and role
    markers, which differ per side; "content": one aligned chunk of the content, the tokens of every side
    that spell the same characters; "end_of_turn"; "template" again for text after the last message),
    ``in_loss`` (True for assistant contents and their end-of-turn tokens), then ``student`` and one column per
    teacher (``teacher_toks``' keys) with that side's tokens. Content chunks are the coarsest common
    refinement over all sides: a chunk closes where every teacher's alignment with the student closes one.
    ``include_prompts=False``: assistant turns only. Every tokenizer needs a chat template (`with_chat_template`)."""
    import pandas as pd

    student = encode_chat(student_tok, messages)
    teachers = {name: encode_chat(tok, messages) for name, tok in teacher_toks.items()}
    sides = {"student": (student_tok, student), **{n: (teacher_toks[n], e) for n, e in teachers.items()}}
    rows = []

    def add(k, part, in_loss, ranges):
        role = student.rendered.roles[k] if k >= 0 else ""
        if include_prompts or role == "assistant":
            row = {"message": k if k >= 0 else None, "role": role, "part": part, "in_loss": in_loss}
            row.update({n: _show(tok, enc.input_ids[a:b]) for (n, (tok, enc)), (a, b) in zip(sides.items(), ranges)})
            rows.append(row)

    done = {n: 0 for n in sides}  # per side, the first position not shown yet
    for k, role in enumerate(student.rendered.roles):
        loss = role == "assistant"
        add(k, "template", False, [(done[n], enc.content_tokens[k][0]) for n, (_, enc) in sides.items()])
        (sa, sb) = student.content_tokens[k]
        cuts = None  # student positions where every teacher's alignment closes a chunk
        maps = {}
        for n, enc in teachers.items():
            ta, tb = enc.content_tokens[k]
            if sb == sa or tb == ta:
                maps[n], cuts = {}, set()
                continue
            a = align(student.input_ids[sa:sb], enc.input_ids[ta:tb], student_tok, teacher_toks[n])
            maps[n] = dict(zip((a.student_spans[:, 1] + sa).tolist(), (a.teacher_spans[:, 1] + ta).tolist()))
            cuts = set(maps[n]) if cuts is None else cuts & set(maps[n])
        cuts = sorted((cuts or set()) - {sb}) + [sb]
        prev = {n: e.content_tokens[k][0] for n, (_, e) in sides.items()}
        for cut in cuts:
            ends = {"student": cut, **{n: maps[n].get(cut, teachers[n].content_tokens[k][1]) for n in teachers}}
            if cut == sb:  # the last chunk takes every side's remaining content tokens
                ends = {n: e.content_tokens[k][1] for n, (_, e) in sides.items()}
            add(k, "content", loss, [(prev[n], ends[n]) for n in sides])
            prev = ends
        done = {n: e.content_tokens[k][1] for n, (_, e) in sides.items()}
        if any(e.end_positions[k] >= 0 for _, e in sides.values()):
            ranges = [
                (p, p + 1) if (p := e.end_positions[k]) >= 0 else (done[n], done[n]) for n, (_, e) in sides.items()
            ]
            add(k, "end_of_turn", loss, ranges)
            done = {n: b for n, (_, b) in zip(sides, ranges)}
    add(-1, "template", False, [(done[n], len(e.input_ids)) for n, (_, e) in sides.items()])
    table = pd.DataFrame(rows, columns=["message", "role", "part", "in_loss", *sides])
    table = table[(table[list(sides)] != "").any(axis=1)].reset_index(drop=True)  # drop parts empty on every side
    table["message"] = table["message"].astype("Int64")
    return table
