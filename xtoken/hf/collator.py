"""`DistillCollator`: text or chat rows -> a training batch (student ids and labels, each teacher's ids and chunk
alignments, cached teacher log-probs), the text prepared the same way for every side."""

from __future__ import annotations

import logging
import re
import unicodedata

import torch

from .teacher import Teacher

logger = logging.getLogger(__name__)


def encode(tok, texts: list[str], max_length: int, offsets: bool = False):
    """Tokenize without padding (lists of ids), truncated to max_length tokens.

    Corpus text is text: a special-token string in it (``<|endoftext|>``, ``<|im_end|>``) is spelled with
    ordinary tokens (``split_special_tokens=True``), never turned into the control token; the specials
    the tokenizer adds by itself (Llama's BOS) stay."""
    return tok(
        texts,
        truncation=True,
        max_length=max_length,
        add_special_tokens=True,
        split_special_tokens=True,
        return_offsets_mapping=offsets,
        return_attention_mask=False,
    )


_SURROGATE = re.compile("[\ud800-\udfff]")
_NORMAL_FORM = re.compile(r'"type"\s*:\s*"(NFKC|NFKD|NFC|NFD)"')


def normal_forms(tok) -> set[str]:
    """The Unicode normal forms (NFC, NFKC, NFD, NFKD) the tokenizer's own normalizer applies to text."""
    norm = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
    if norm is None:
        return set()
    try:
        spec = norm.__getstate__()
    except Exception:  # a normalizer that cannot describe itself: assume none
        return set()
    return set(_NORMAL_FORM.findall(spec.decode() if isinstance(spec, bytes) else str(spec)))


def _pick_form(forms: set[str]) -> str | None:
    """One form that satisfies every normalizer in ``forms``: a compatibility form (NFKC/NFKD) covers its
    canonical one (NFKC text is NFC text). Composed and decomposed forms together cannot both hold: the
    composed one is used and a warning says so."""
    composed, decomposed = forms & {"NFKC", "NFC"}, forms & {"NFKD", "NFD"}
    if composed and decomposed:
        logger.warning(
            "the tokenizers normalize text to %s: no one form suits all; using %s",
            sorted(forms),
            "NFKC" if "NFKC" in composed else "NFC",
        )
    for form in ("NFKC", "NFC", "NFKD", "NFD"):
        if form in forms:
            return form
    return None


def pad(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to [B, L] with an attention mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


class DistillCollator:
    """Dataset rows with a ``text`` column (or ``prompt`` and ``completion``, trained on as one text), and
    optionally ``idx`` -> a training batch.

    The student tokenizes each text, truncated to ``max_length`` tokens; the text is then cut at the
    end of the student's last token, so every teacher sees exactly the same text (a teacher's own
    tokenization is truncated to ``teacher_max_length``, default 2 x max_length). Chunk alignments
    (`xtoken.align.align_batch`) are computed here, so with ``dataloader_num_workers > 0`` they
    overlap the training step. Cached teacher log-probabilities (``Teacher.cache``) are looked up here
    by ``idx`` too. ``memo``: an `xtoken.align.AlignmentMemo` that keeps every row's tokenizations and
    alignments for the next time the same text comes by (epochs, or many runs over one corpus in one
    process); batches are identical with or without it.

    Text is prepared before any tokenizer sees it, the same way for the student and every teacher
    (`prepare_texts`), so chunk pairs pair the same characters:

    - undecodable text: a lone UTF-16 surrogate (``"abc\\ud800def"``, from a broken JSON escape or a
      bad decode) has no UTF-8 form and crashes a tokenizer. Surrogate pairs split into two code
      units are joined into their character; a lone surrogate becomes U+FFFD (the replacement
      character). Each repaired row is logged (a warning naming the row: its ``idx``, else its place
      in the batch) and counted in ``repaired_rows``.
    - Unicode normal form (``normalize="auto"``): when a tokenizer's own normalizer rewrites text
      (Qwen3: NFC), the text is brought to that form first for every side; otherwise a decomposed
      (NFD) text reaches the student as written and the teacher composed, and their bytes disagree at
      every accent (160 of 282 student tokens unpaired in a German NFD sample). The form used is
      ``normal_form`` (None: no tokenizer normalizes, the text is left as written); pass
      ``normalize=None`` to switch this off or a form ("NFC", ...) to force one. Text already in the
      form (all ASCII text, the miniature's corpus) is untouched.
    - special-token strings in the text stay text (see `encode`).

    Empty texts are kept: they give rows without targets (zero loss, no NaN).

    Chat rows (``chat=True``, or ``chat={side: family}``): a row with a ``messages`` column (a list of
    ``{"role", "content"}``) is rendered by each side with its own chat template (`xtoken.chat`): the student's
    row is its rendering (``labels`` and ``kd_mask`` cover the assistant contents and the student's end-of-turn
    tokens only), each teacher renders the same messages in its own template, and its chunk pairs come from
    `xtoken.chat.align_chat` (assistant contents, and each end-of-turn pair checked against W's SPECIAL row).
    At construction every side (``"student"`` and each teacher's name) gets a template: its own, else that of
    the family given in ``chat``, else of the family its tokenizer's name or special tokens show
    (`chat_family`); a side with none raises ValueError naming it. Contents are prepared like text first
    (`prepare_texts`). Each side is truncated on its own (student ``max_length``, teachers
    ``teacher_max_length``): a turn cut on one side only leaves its tokens on the other unpaired. A batch is
    all text rows or all chat rows: a mixed batch raises ValueError naming the rows (put text rows in a
    one-turn conversation, or train the two kinds in separate runs). `TeacherCache` is built from text rows
    only (it calls `tokenize`): chat rows with a cached teacher raise ValueError (use the live teacher).

    Batch layout::

        input_ids, attention_mask, labels   [B, L] student (labels: ids, padding -> -100)
        idx                                 [B] dataset row indices (when rows have ``idx``)
        teachers: {name: {input_ids, attention_mask [B, L_m], alignments: list[Alignment] | None,
                          logprobs [B, L_m, V_m] float16 (only with a cache)}}
        prompts                             list[str], only with ``keep_prompts`` (on-policy training): each
                                            row's ``prompt``, else its whole ``text`` (`xtoken.hf.onpolicy`);
                                            chat rows: list[list[dict]], the messages before the last
                                            assistant turn
        kd_mask, loss_tokens                chat rows only: kd_mask [B, L] (1 on the logits predicting a loss
                                            position), loss_tokens [B] (the student's loss positions per row)
    """

    def __init__(
        self,
        student_tokenizer,
        teachers: list[Teacher],
        max_length: int = 512,
        teacher_max_length: int | None = None,
        memo=None,
        normalize: str | None = "auto",
        chat: bool | dict = False,
    ):
        self.student_tokenizer = student_tokenizer
        self.memo = memo
        self.teachers = list(teachers)
        self.max_length = max_length
        self.teacher_max_length = teacher_max_length or 2 * max_length
        if normalize == "auto":
            forms = normal_forms(student_tokenizer)
            for t in self.teachers:
                forms |= normal_forms(t.tokenizer)
            normalize = _pick_form(forms)
        if normalize not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"normalize must be 'auto', None, 'NFC', 'NFKC', 'NFD' or 'NFKD', not {normalize!r}")
        self.normal_form = normalize
        self.repaired_rows = 0
        self.keep_prompts = False  # set by XTokenTrainer when lmbda > 0: batches carry their rows' prompts
        for t in self.teachers:  # 'kl' compares positions 1:1, so it reuses the student's ids
            if t.loss == "kl" and t.tokenizer is not student_tokenizer:
                from ..tokenizers import tokenizer_fingerprint

                if tokenizer_fingerprint(t.tokenizer) != tokenizer_fingerprint(student_tokenizer):
                    raise ValueError(
                        f"teacher {t.name!r} uses loss 'kl' but its tokenizer is not the student's; "
                        "use a cross-tokenizer loss (p_kl, h_kl, gold, uld) with a projection"
                    )
            if t.loss != "kl" and hasattr(t.projection, "check_tokenizers"):
                t.projection.check_tokenizers(student_tokenizer, t.tokenizer, source=f"W of teacher {t.name!r}")
        self.chat = bool(chat)
        if chat:  # every side gets its chat template now, so a side without one fails here, not mid-training
            families = chat if isinstance(chat, dict) else {}
            sides = [("student", student_tokenizer)] + [(t.name, t.tokenizer) for t in self.teachers]
            for side, tok in sides:
                set_chat_template(tok, side, families.get(side))

    def prepare_texts(self, texts: list[str], names: list | None = None) -> list[str]:
        """The texts every side tokenizes: surrogates repaired, brought to ``normal_form`` (see the class
        docstring). ``names``: how warnings name each row (default: its place in ``texts``)."""
        out = list(texts)
        for i, text in enumerate(out):
            if not isinstance(text, str):
                raise TypeError(f"row {names[i] if names else i}: text must be a str, not {type(text).__name__}")
            if text.isascii():  # the common case: nothing to repair or normalize
                continue
            if _SURROGATE.search(text):
                n = len(_SURROGATE.findall(text))
                text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
                self.repaired_rows += 1
                logger.warning(
                    "row %s: %d UTF-16 surrogate code unit(s) in the text; pairs joined, lone ones "
                    "replaced by U+FFFD (%d row(s) repaired so far)",
                    names[i] if names else i,
                    n,
                    self.repaired_rows,
                )
            if self.normal_form and not unicodedata.is_normalized(self.normal_form, text):
                text = unicodedata.normalize(self.normal_form, text)
            out[i] = text
        return out

    def tokenize(
        self, texts: list[str], names: list | None = None
    ) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
        """Student ids and each teacher's ids of the same (prepared, student-truncated) texts, unpadded."""
        texts = self.prepare_texts(texts, names)
        pairs = self._memoized(("student", self.student_tokenizer, self.max_length), texts, self._student_ids)
        student, cut = [p[0] for p in pairs], [p[1] for p in pairs]
        return student, self.teacher_ids(cut, student)

    def teacher_ids(self, texts: list[str], student: list[list[int]], memo: bool = True) -> dict[str, list[list[int]]]:
        """Each teacher's ids of ``texts`` (the text of each student row ``student``), unpadded; a 'kl' teacher
        or one with the student's tokenizer reuses the student's rows. ``memo=False``: bypass ``self.memo``
        (text seen once, as a student's generation)."""
        teachers = {}
        for t in self.teachers:
            if t.loss == "kl" or t.tokenizer is self.student_tokenizer:
                teachers[t.name] = student
            else:
                teachers[t.name] = self._memoized(
                    ("teacher", t.tokenizer, self.teacher_max_length),
                    texts,
                    lambda xs, tok=t.tokenizer: encode(tok, xs, self.teacher_max_length)["input_ids"],
                    use_memo=memo,
                )
        return teachers

    def _student_ids(self, texts: list[str]) -> list[tuple[list[int], str]]:
        """(ids, text cut at the end of the last kept token) per text."""
        enc = encode(self.student_tokenizer, texts, self.max_length, offsets=True)
        return [
            (ids, text[: max((e for _, e in offs), default=0)])
            for ids, text, offs in zip(enc["input_ids"], texts, enc["offset_mapping"])
        ]

    def _memoized(self, what: tuple, texts: list[str], encode, use_memo: bool = True) -> list:
        """encode(texts), reading rows seen before from ``self.memo`` (the misses are encoded in one call).
        Keys hold the tokenizer's id; values keep the tokenizer alive, so an id is never reused meanwhile."""
        if self.memo is None or not use_memo:
            return encode(texts)
        kind, tok, length = what
        keys = [("tokens", kind, id(tok), length, x) for x in texts]
        out = [self.memo.get(k) for k in keys]
        miss = [i for i, v in enumerate(out) if v is None]
        if miss:
            for i, v in zip(miss, encode([texts[i] for i in miss])):
                out[i] = (v, tok)
                self.memo.put(keys[i], out[i])
        return [v[0] for v in out]

    def __call__(self, rows: list[dict]) -> dict:
        names = [f"idx {r['idx']}" if "idx" in r else f"{i} of the batch" for i, r in enumerate(rows)]
        if any(r.get("messages") is not None for r in rows):
            return self.chat_batch(rows, names)
        texts = [row_text(r, name) for r, name in zip(rows, names)]
        student, per_teacher = self.tokenize(texts, names)
        batch = self.assemble(
            student, per_teacher, [int(r["idx"]) for r in rows] if rows and "idx" in rows[0] else None
        )
        if self.keep_prompts:  # on-policy batches continue these (xtoken.hf.onpolicy)
            batch["prompts"] = [row_prompt(r, name) for r, name in zip(rows, names)]
        return batch

    def prepare_messages(self, messages, name: str) -> list[dict]:
        """``messages`` with every content prepared as text is (`prepare_texts`: surrogates repaired, the common
        normal form), so each side's template inserts the same string (Qwen3 normalizes to NFC by itself:
        without this its content bytes would differ from the student's). Roles and contents are checked by
        `xtoken.chat.render_chat` later; here only what `prepare_texts` needs (a list of dicts)."""
        if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
            raise ValueError(f"row {name}: messages must be a list of {{'role', 'content'}} dicts")
        messages = list(messages)
        contents = [m.get("content") if isinstance(m, dict) else None for m in messages]
        keep = [k for k, c in enumerate(contents) if isinstance(c, str)]  # the rest: render_chat names the error
        prepared = self.prepare_texts([contents[k] for k in keep], [f"{name} message {k}" for k in keep])
        out = [dict(m) if isinstance(m, dict) else m for m in messages]
        for k, text in zip(keep, prepared):
            out[k]["content"] = text
        return out

    def chat_batch(self, rows: list[dict], names: list[str]) -> dict:
        """The batch of chat rows (see the class docstring): each side renders and tokenizes the messages with its
        own template (`xtoken.chat.encode_chat`), the student's labels and kd_mask cover its assistant turns and
        end-of-turn tokens, each cross-tokenizer teacher's alignments come from `xtoken.chat.align_chat`. Raises
        ValueError for a mixed batch, a collator built without ``chat``, or bad messages (naming the row)."""
        from ..chat import align_chat, encode_chat

        text_rows = [n for r, n in zip(rows, names) if r.get("messages") is None]
        if text_rows:
            raise ValueError(
                f"a batch mixes chat rows ('messages') and text rows ({', '.join(text_rows[:5])}): a batch must be "
                "all one kind; give text rows as one-turn conversations, or train the two kinds separately"
            )
        if not self.chat:
            raise ValueError(
                f"row {names[0]} has 'messages' but the collator was built without chat=True: build it with "
                "DistillCollator(..., chat=True) (XTokenTrainer does when the dataset has a 'messages' column)"
            )
        cached = [t.name for t in self.teachers if t.cache is not None]
        if cached:  # a TeacherCache holds the text rows' tokens (`tokenize`), never a chat rendering
            raise ValueError(
                f"chat rows: teacher(s) {cached} have a TeacherCache, which holds text rows only; train chat rows "
                "with live teachers (Teacher.cache=None)"
            )
        convs = [self.prepare_messages(r["messages"], n) for r, n in zip(rows, names)]
        stok = self.student_tokenizer
        s_enc = [_named(n, encode_chat, stok, c, self.max_length) for c, n in zip(convs, names)]
        student = [e.input_ids for e in s_enc]
        per_teacher, alignments = {}, {}
        for t in self.teachers:
            same = t.loss == "kl" or t.tokenizer is stok
            t_enc = (
                s_enc
                if same
                else [_named(n, encode_chat, t.tokenizer, c, self.teacher_max_length) for c, n in zip(convs, names)]
            )
            per_teacher[t.name] = [e.input_ids for e in t_enc]
            if t.loss != "kl":
                W = t.projection if hasattr(t.projection, "indices") else None  # the end-of-turn pairs are checked
                alignments[t.name] = [
                    _named(n, align_chat, s, e, stok, t.tokenizer, projection=W) for s, e, n in zip(s_enc, t_enc, names)
                ]
        idx = [int(r["idx"]) for r in rows] if "idx" in rows[0] else None
        batch = self.assemble(student, per_teacher, idx, alignments=alignments)
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        kd_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, e in enumerate(s_enc):
            labels[b, : len(e.input_ids)] = e.labels
            kd_mask[b, : len(e.input_ids)] = e.kd_mask
        batch.update(labels=labels, kd_mask=kd_mask, loss_tokens=(labels != -100).sum(1))
        if self.keep_prompts:  # on-policy: the messages before the last assistant turn (xtoken.hf.onpolicy)
            batch["prompts"] = [chat_prompt(c) for c in convs]
        return batch

    def assemble(
        self,
        student: list[list[int]],
        per_teacher: dict[str, list[list[int]]],
        idx: list[int] | None = None,
        cached: bool = True,
        memo: bool = True,
        alignments: dict | None = None,
    ) -> dict:
        """The batch (layout in the class docstring) from unpadded student rows and each teacher's rows of the
        same texts: padding, labels, chunk alignments and (``cached``) the teachers' cached log-probs by ``idx``.
        ``memo=False``: alignments bypass ``self.memo``. ``alignments``: {teacher name: list[Alignment]} computed
        by the caller (chat rows), used instead of `xtoken.align.align_batch` for those teachers."""
        from ..align import align_batch

        ids, mask = pad(student, pad_id(self.student_tokenizer))
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        if idx is not None:
            batch["idx"] = torch.tensor(idx, dtype=torch.long)
        batch["teachers"] = {}
        for t in self.teachers:
            t_ids, t_mask = pad(per_teacher[t.name], pad_id(t.tokenizer))
            entry = {"input_ids": t_ids, "attention_mask": t_mask, "alignments": None}
            if t.loss != "kl" and alignments is not None and t.name in alignments:
                entry["alignments"] = list(alignments[t.name])
            elif t.loss != "kl":
                entry["alignments"] = align_batch(
                    ids,
                    t_ids,
                    self.student_tokenizer,
                    t.tokenizer,
                    student_mask=mask,
                    teacher_mask=t_mask,
                    memo=self.memo if memo else None,
                )
            if cached and t.cache is not None:
                if "idx" not in batch:
                    raise KeyError(f"teacher {t.name!r} has a cache: dataset rows need an 'idx' column")
                entry["logprobs"] = t.cache.rows(batch["idx"], t_ids.shape[1], per_teacher[t.name])
            batch["teachers"][t.name] = entry
        return batch


def row_text(row: dict, name: str) -> str:
    """The text a row trains on off-policy: its ``text``, else ``prompt`` + ``completion``."""
    if "text" in row:
        return row["text"]
    if "prompt" in row:
        return row["prompt"] + row.get("completion", "")
    raise KeyError(f"row {name}: a row needs a 'text' column, or 'prompt' (and 'completion'); it has {sorted(row)}")


def row_prompt(row: dict, name: str) -> str:
    """What an on-policy batch continues: the row's ``prompt``, else its whole ``text``."""
    prompt = row["prompt"] if "prompt" in row else row.get("text")
    if not isinstance(prompt, str):
        raise TypeError(f"row {name}: the prompt must be a str, not {type(prompt).__name__}")
    return prompt


def chat_prompt(messages: list[dict]) -> list[dict]:
    """The messages an on-policy chat row continues: those before its last assistant turn."""
    last = max((k for k, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def _named(name: str, fn, *args, **kw):
    """``fn(*args, **kw)``, a ValueError raised by it prefixed with the row ``name``."""
    try:
        return fn(*args, **kw)
    except ValueError as e:
        raise ValueError(f"row {name}: {e}") from e


def chat_family(tok) -> str | None:
    """The chat-template family (a key of `xtoken.chat.CHAT_TEMPLATES`) of ``tok``: from its name (one of the
    paper's models, or a renumbered copy ``name@restricted...``), else the one family whose template tokens are
    all special tokens of ``tok``; None when neither tells."""
    from ..chat import CHAT_TEMPLATES, TEMPLATE_TOKENS, _family, _special_strings

    name = str(getattr(tok, "name_or_path", "") or "").split("@")[0]
    if name:
        try:
            return _family(name)
        except (ValueError, KeyError):
            pass
    specials = set(_special_strings(tok))
    found = [f for f in CHAT_TEMPLATES if all(s in specials for s in TEMPLATE_TOKENS[f])]
    return found[0] if len(found) == 1 else None


def set_chat_template(tok, side: str, family: str | None = None) -> None:
    """Give ``tok`` (the tokenizer of ``side``: "student" or a teacher's name) a chat template, in place: its own
    if it has one, else that of ``family``, else of `chat_family`. Raises ValueError naming the side when none
    can be found or the family's template does not fit the tokenizer."""
    from ..chat import CHAT_TEMPLATES, with_chat_template

    if getattr(tok, "chat_template", None):
        return
    family = family or chat_family(tok)
    if family is None:
        raise ValueError(
            f"chat rows: the {side if side == 'student' else f'teacher {side!r}'} tokenizer "
            f"({getattr(tok, 'name_or_path', '') or type(tok).__name__}) has no chat template and no known family "
            f"to set one: pass chat={{{side!r}: family}} (families {sorted(CHAT_TEMPLATES)}) or set "
            "tokenizer.chat_template"
        )
    try:
        with_chat_template(tok, family)
    except ValueError as e:
        raise ValueError(f"chat rows, side {side!r}: {e}") from e


def unpaired_share(alignments, inputs: dict) -> float | None:
    """The share of the student's loss positions in no chunk pair with one teacher (``alignments``: its list).
    The denominator: each row's valid positions from its generated part on (``gen_start``, on-policy) or, for
    chat rows, its loss positions (``loss_tokens``: `xtoken.chat.align_chat` lists unpaired positions among
    those only). None when there are no positions."""
    if "loss_tokens" in inputs and "gen_start" not in inputs:
        valid = int(inputs["loss_tokens"].sum())
    else:
        start = inputs.get("gen_start", [0] * len(alignments))
        valid = sum(a.student_valid[1] - max(a.student_valid[0], int(s)) for a, s in zip(alignments, start))
    if not valid:
        return None
    return sum(len(a.student_unpaired) for a in alignments) / valid


def wants_chat(dataset) -> bool:
    """Whether ``dataset`` (a `datasets.Dataset`, a list of row dicts, or None) has chat rows: a ``messages``
    column (or first row key)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None and isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], dict):
        columns = list(dataset[0])
    return "messages" in (columns or [])
