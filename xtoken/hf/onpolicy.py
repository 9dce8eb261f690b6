"""On-policy batches: the student continues each row's prompt and the teachers score the student's own text.

One job: turn an off-policy batch (from `DistillCollator` with ``keep_prompts``) into an on-policy one.
`XTokenTrainer` draws the decision per micro-batch (`OnPolicy.decide`, probability ``XTokenConfig.lmbda``,
GKD's convention) and calls `OnPolicy.prepare` before its training step.

    prompts (row ``prompt``, else its whole ``text``)
      -> student prompt ids  [len P_b each]                 the collator's conventions (BOS, specials as text)
      -> student.generate    [B, P + N] (left-padded, KV cache, no grad, eval mode, then the mode restored)
      -> each continuation cut at its first stop id        (eos, pad, any special token, an id past the tokenizer)
         and just after its first stop string, kept        (``stop_strings``: the evaluation's own, e.g. "\\n\\n")
      -> student row  = prompt ids + generated ids          (the student's own tokens, never re-tokenized)
         teacher text = prompt text + the generation decoded once; each teacher tokenizes it in its own way
      -> `DistillCollator.assemble` (alignments by `xtoken.align`), no cache: teachers run live
      -> the prompt masked on every side (`mask_prompt`)

Masking. Row b's generated tokens are its student positions P_b .. end-1; the logits predicting them are
P_b - 1 .. end - 2. ``labels`` keep the generated tokens only; CE on them (the student's own sample) is trained only
with ``on_policy_ce=True``: by default an on-policy batch trains KD alone (its ``ce_weight`` is 0; the CE value is
still logged and still sets the dynamic KD scale). ``kd_mask`` [B, L] marks the predicting logits (what 'kl' reads), and
each alignment keeps only the chunk pairs whose student span starts at or after P_b. A chunk pair spells the
same bytes on both sides, so its teacher span lies in the generated text too: the teacher's prompt tokens carry
no loss either. A teacher token that straddles the prompt's end (prompt "x =", generation " 4", a teacher
token "= ") puts its chunk partly in the prompt: that chunk is dropped, so the first generated token(s) may go
undistilled for that teacher.

Handling of bad input (never a silent zero loss):

- a prompt with no student token, or with more than ``max_length - 1`` (no room to generate): `ValueError`
  naming the row. Off-policy rows are truncated instead; on-policy prompts are not cut, since the student
  would then continue a text other than the row's.
- a generation is cut at its first stop id: eos or pad (the end), or any other special token (a chat marker
  mid-text: what follows is not text of this row and is dropped). The stop id itself is not trained on (its
  bytes are none, so teachers of other tokenizers could not score it). Ids the tokenizer has no token for
  (padded logit columns) stop it as well. Generations are also cut to ``max_length`` tokens in all.
- ``stop_strings`` (text rows): a row stops once its generated text contains one (`StopOnText`, checked on the
  last tokens at every generation step) and is cut just after the first; the stop text is kept and trained on,
  so the student learns where an answer ends. Without them a row runs to ``max_new_tokens`` (a student that
  writes past its answer is then distilled on what it invents there). Chat rows end at their end-of-turn token.
- an empty generation (the student stops at once): that row has no KD or CE position.
- a generation whose text a teacher tokenizes into an id its model has no embedding for (a teacher over a
  restricted vocabulary, like the miniature's): cut before the token that brings it (`fit_to_teachers`); a
  prompt that does so raises.
- a batch in which no row generated anything: trained off-policy instead (the batch it came from), with a
  warning; counted in `OnPolicy.empty_batches` and visible in the logs as ``gen_empty_rows`` = 1 with
  ``on_policy`` = 0.
- ``lmbda > 0`` with a teacher that has a cache but no model, with no teacher and ``on_policy_ce=False`` (an
  on-policy batch would have no loss), or ``use_vllm=True``: refused by `check_setup`.

Chat rows (``messages``, `DistillCollator` with ``chat``): the prompt is the conversation before its last
assistant turn, rendered by the student's template with the generation prompt; a generation that stops at the
student's end-of-turn (or eos) keeps that token, and each teacher gets its own end-of-turn token after the
decoded text, paired with the student's (`xtoken.hf.chat_onpolicy`).

Logged per micro-batch (means over the logging window): ``on_policy`` (0/1), and for batches drawn on-policy
``gen_tokens`` (mean generated length, student tokens) and ``gen_empty_rows`` (share of rows that generated
nothing).

Generation runs on the unwrapped student (``accelerator.unwrap_model``): under DDP each rank generates for its
own shard, with no collective. Sharded models (FSDP, ZeRO-3) would need their parameters gathered first: not
supported yet.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from transformers import StoppingCriteria

from .collator import DistillCollator, pad_id

logger = logging.getLogger(__name__)


def check_setup(args, teachers, collator) -> None:
    """Refuse what on-policy training (``args.lmbda > 0``) cannot do, and ask a `DistillCollator` to keep
    each row's prompt in its batches. Raises ValueError (a teacher with a cache but no model: the student's
    text is new, so every teacher runs live) or NotImplementedError (``use_vllm``)."""
    if args.use_vllm:
        raise NotImplementedError(
            "use_vllm=True: a vLLM generation path is not implemented yet; use_vllm=False generates with the "
            "student's own HF generate (KV cache)"
        )
    if not teachers and not args.on_policy_ce:
        raise ValueError(
            f"lmbda={args.lmbda} > 0 with no teacher and on_policy_ce=False: an on-policy batch would have no loss "
            "(KD needs a teacher; CE on the student's own samples is off). Add a teacher, or set on_policy_ce=True "
            "to train CE on the student's own samples (self-training; it degenerates, see XTokenConfig's help)"
        )
    for t in teachers:
        if t.model is None:
            raise ValueError(
                f"lmbda={args.lmbda} > 0 but teacher {t.name!r} has no model (only a cache): on-policy batches "
                "are the student's new text, which a cache cannot hold; pass the teacher's model (its cache is "
                "still used on the off-policy batches)"
            )
    if isinstance(collator, DistillCollator):
        collator.keep_prompts = True


def stop_ids(tokenizer) -> set[int]:
    """Ids that end a generation: eos, pad and every special token of ``tokenizer`` (its named specials and
    every added token marked special: chat markers, reserved ids; Qwen's ``<think>``, added but not special,
    is text)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if t.special)
    for name in ("eos_token_id", "pad_token_id"):
        i = getattr(tokenizer, name, None)
        if i is not None:
            ids.add(int(i))
    return ids


def cut_at_stop(row: list[int], stops: set[int], id_limit: int) -> list[int]:
    """``row`` up to (not including) its first stop id or id >= ``id_limit`` (no token of the tokenizer)."""
    for i, x in enumerate(row):
        if x in stops or x >= id_limit:
            return row[:i]
    return row


def cut_at_text(tokenizer, prompt: list[int], row: list[int], stop_strings) -> list[int]:
    """``row`` up to and including the token that completes the first of ``stop_strings`` in its text as it
    continues ``prompt`` (`decode_generation`): the shortest prefix whose text contains one. ``row`` unchanged
    when its text contains none (or ``stop_strings`` is empty)."""
    found = lambda k: any(s in decode_generation(tokenizer, prompt, row[:k]) for s in stop_strings)  # noqa: E731
    if not stop_strings or not found(len(row)):
        return row
    lo, hi = 1, len(row)  # a prefix's text is a prefix of the row's: `found` is monotone in k, so bisect
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if found(mid) else (mid + 1, hi)
    return row[:lo]


class StopOnText(StoppingCriteria):
    """A `transformers` stopping criterion: row b is done once the text generated past column ``width`` contains
    one of ``stop_strings``. Reads the last few generated tokens only (enough for the longest stop string even
    at one byte a token), so a step costs one short decode per row."""

    def __init__(self, tokenizer, stop_strings, width: int):
        self.tokenizer, self.stop_strings, self.width = tokenizer, list(stop_strings), width
        self.tail = 4 * max(len(s) for s in self.stop_strings) + 1

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.width, input_ids.shape[1] - self.tail) :].tolist()
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        done = [any(s in t for s in self.stop_strings) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def encode_prompts(tokenizer, prompts: list[str], max_length: int, names: list[str]) -> list[list[int]]:
    """The student's ids of each prompt, untruncated, with the collator's conventions (the tokenizer's own
    specials added, special-token strings kept as text). Raises ValueError naming the row for a prompt with
    no token or more than ``max_length - 1`` (no room to generate)."""
    ids = tokenizer(prompts, add_special_tokens=True, split_special_tokens=True, return_attention_mask=False)
    ids = [list(r) for r in ids["input_ids"]]
    for row, name in zip(ids, names):
        if not row:
            raise ValueError(f"row {name}: the prompt has no student token, so there is nothing to continue")
        if len(row) > max_length - 1:
            raise ValueError(
                f"row {name}: the prompt is {len(row)} student tokens, but max_length={max_length} leaves room "
                f"for at most {max_length - 1} (one generated token at least); shorten the prompt or raise "
                "max_length (on-policy prompts are never truncated)"
            )
    return ids


def generate(
    model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, args, stop_strings=()
) -> list[list[int]]:
    """The student's continuations of ``prompt_ids``: left-padded [B, P] batch, ``model.generate`` with the KV
    cache under ``torch.no_grad`` in eval mode (the previous mode restored, also on an error); sampling from
    ``args`` (``generation_temperature`` 0: greedy; ``top_p``, ``top_k``); a row also stops once its generated
    text contains one of ``stop_strings`` (`StopOnText`). Returns each row's generated ids [<= max_new_tokens]
    as generate returned them (stop and pad ids included; `cut_at_stop` and `cut_at_text` cut them)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    fill = pad_id(tokenizer)
    width = max(len(r) for r in prompt_ids)
    ids = torch.full((len(prompt_ids), width), fill, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(prompt_ids):  # left padding: every row's next token is at the same column
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
    sample = args.generation_temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        use_cache=True,
        eos_token_id=sorted(stop_ids(tokenizer)),  # a row ends at any id it would be cut at (`cut_at_stop`)
        pad_token_id=fill,
        **(dict(temperature=args.generation_temperature, top_p=args.top_p, top_k=args.top_k) if sample else {}),
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            stopping = (
                {"stopping_criteria": StoppingCriteriaList([StopOnText(tokenizer, stop_strings, width)])}
                if stop_strings
                else {}  # nothing extra passed: a generate that takes no stopping criteria still works
            )
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                **stopping,
            )
    finally:
        model.train(was_training)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[:, width:].tolist()


def decode_generation(tokenizer, prompt: list[int], generated: list[int]) -> str:
    """The text of ``generated`` as it continues ``prompt``: decode(prompt + generated) past decode(prompt), so a
    decoder that treats a sequence's first token apart (SentencePiece's leading space) spells it as in the
    whole; else decode(generated) alone."""
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    head, whole = tokenizer.decode(prompt, **kw), tokenizer.decode(prompt + generated, **kw)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(generated, **kw)


def generated_part(a, start: int):
    """Alignment ``a`` restricted to the chunk pairs whose student span starts at or after ``start`` (the first
    generated position), with the unpaired positions of the generated part only. Positions are unchanged
    (``student_valid`` too, so a chunk at ``start`` keeps its predicting logit ``start - 1``)."""
    keep = a.student_spans[:, 0] >= start
    t_start = int(a.teacher_spans[keep][0, 0]) if keep.any() else a.teacher_valid[1]
    return dataclasses.replace(
        a,
        student_spans=a.student_spans[keep],
        teacher_spans=a.teacher_spans[keep],
        is_special=a.is_special[keep],
        student_unpaired=a.student_unpaired[a.student_unpaired >= start],
        teacher_unpaired=a.teacher_unpaired[a.teacher_unpaired >= t_start],
    )


def mask_prompt(batch: dict, starts: list[int]) -> dict:
    """Mask each row's prompt (student positions < ``starts[b]``) on every side of ``batch``, in place:
    ``labels`` -100 there, ``kd_mask`` [B, L] (1 on the logits predicting generated tokens), ``gen_start`` [B],
    and every alignment cut to its generated part (`generated_part`). Returns the batch."""
    mask = batch["attention_mask"].bool()
    start = torch.tensor(starts, dtype=torch.long)
    generated = (torch.arange(mask.shape[1]).unsqueeze(0) >= start.unsqueeze(1)) & mask
    batch["labels"] = batch["labels"].masked_fill(~generated, -100)
    kd_mask = torch.zeros_like(batch["attention_mask"])
    kd_mask[:, :-1] = generated[:, 1:].long()  # logit p predicts token p + 1
    batch["kd_mask"] = kd_mask
    batch["gen_start"] = start
    for entry in batch["teachers"].values():
        if entry.get("alignments") is not None:
            entry["alignments"] = [generated_part(a, s) for a, s in zip(entry["alignments"], starts)]
    return batch


def on_policy_batch(model, collator: DistillCollator, prompts: list, names: list[str], idx, args):
    """The on-policy batch of ``prompts`` (see the module docstring): the student generates, its text is
    tokenized by each teacher and aligned, the prompt is masked on every side. ``idx``: the rows' dataset
    indices (a list, or None). ``prompts`` of chat rows (lists of messages) go to
    `xtoken.hf.chat_onpolicy.chat_on_policy_batch`. Returns (batch, generated lengths per row)."""
    if prompts and not isinstance(prompts[0], str):
        from .chat_onpolicy import chat_on_policy_batch

        return chat_on_policy_batch(model, collator, prompts, names, idx, args)
    tok = collator.student_tokenizer
    prompts = collator.prepare_texts(prompts, names)
    prompt_ids = encode_prompts(tok, prompts, collator.max_length, names)
    budget = min(args.max_new_tokens, collator.max_length - min(len(p) for p in prompt_ids))
    raw = generate(model, tok, prompt_ids, budget, args, stop_strings=args.stop_strings)
    stops, limit = stop_ids(tok), len(tok)
    gens = [
        cut_at_text(tok, p, cut_at_stop(g, stops, limit), args.stop_strings)[: collator.max_length - len(p)]
        for g, p in zip(raw, prompt_ids)
    ]
    gens, texts, per_teacher = fit_to_teachers(collator, prompts, prompt_ids, gens)
    student = [p + g for p, g in zip(prompt_ids, gens)]
    batch = collator.assemble(student, per_teacher, idx, cached=False, memo=False)
    return mask_prompt(batch, [len(p) for p in prompt_ids]), [len(g) for g in gens]


def teacher_id_limits(collator: DistillCollator) -> dict[str, int]:
    """{teacher: the number of input embeddings its model has}, for teachers with a model."""
    out = {}
    for t in collator.teachers:
        emb = t.model.get_input_embeddings() if t.model is not None else None
        if emb is not None:
            out[t.name] = int(emb.num_embeddings)
    return out


def fit_to_teachers(collator: DistillCollator, prompts: list[str], prompt_ids: list, gens: list):
    """Each generation cut before the first token whose text a teacher tokenizes into an id its model has no
    embedding for (a teacher over a restricted vocabulary, like the miniature's, reading the student's free text):
    such a row could not be scored past that point. Full-vocabulary teachers never cut. Returns (generations,
    texts, each teacher's ids of the texts); the cuts are rare, so a row is re-tokenized after each cut."""
    tok, limits = collator.student_tokenizer, teacher_id_limits(collator)

    def encode_rows(rows):
        texts = [prompts[b] + decode_generation(tok, prompt_ids[b], gens[b]) for b in rows]
        return texts, collator.teacher_ids(texts, [prompt_ids[b] + gens[b] for b in rows], memo=False)

    texts, per_teacher = encode_rows(range(len(gens)))
    bad = lambda ids_of, j: any(ids_of[n][j] and max(ids_of[n][j]) >= lim for n, lim in limits.items())  # noqa: E731
    for b in [b for b in range(len(gens)) if bad(per_teacher, b)]:
        while gens[b]:
            gens[b] = gens[b][:-1]
            (text,), ids = encode_rows([b])
            if not bad(ids, 0):
                break
        (texts[b],), ids = encode_rows([b])
        for name in per_teacher:
            per_teacher[name][b] = ids[name][0]
        if bad(ids, 0):
            raise ValueError(
                f"the prompt of {b} of the batch tokenizes, for a teacher, into ids its model does not have"
            )
    return gens, texts, per_teacher


class OnPolicy:
    """The trainer's on-policy switch: draws each micro-batch's decision and builds the on-policy batch.

    ``args``: the `XTokenConfig` (lmbda, seed, sampling settings); ``collator``: the `DistillCollator` whose
    batches carry ``prompts``."""

    def __init__(self, args, collator):
        if not isinstance(collator, DistillCollator):
            raise ValueError(
                f"lmbda > 0 needs a DistillCollator to tokenize and align the student's generations, not "
                f"{type(collator).__name__}"
            )
        self.args, self.collator = args, collator
        self.empty_batches = 0  # batches drawn on-policy in which no row generated anything
        self._step, self._micro = -1, 0

    def decide(self, step: int) -> bool:
        """Whether the next micro-batch of optimizer step ``step`` is on-policy: a uniform draw < lmbda from a
        generator seeded by (seed, step, micro-batch index within the step). Deterministic, the same on every DDP
        rank (so collectives stay in step), the same after a resume."""
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        rng = np.random.default_rng([int(self.args.seed) & 0xFFFFFFFF, int(step), self._micro])
        return bool(rng.random() < self.args.lmbda)

    def prepare(self, model, inputs: dict, step: int) -> dict:
        """``inputs`` (a collator batch) as trained at step ``step``: on-policy with probability lmbda, else as it
        is; ``policy_metrics`` added either way. ``model``: the unwrapped student."""
        if not self.decide(step):
            return {**inputs, "policy_metrics": {"on_policy": 0.0}}
        prompts = inputs.get("prompts")
        if prompts is None:
            raise ValueError(
                "an on-policy batch needs its rows' prompts: the batch has no 'prompts' (a DistillCollator "
                "adds them when keep_prompts is set, which XTokenTrainer does for lmbda > 0)"
            )
        idx = inputs["idx"].tolist() if "idx" in inputs else None
        names = [f"idx {i}" for i in idx] if idx is not None else [f"{b} of the batch" for b in range(len(prompts))]
        batch, lengths = on_policy_batch(model, self.collator, list(prompts), names, idx, self.args)
        empty = sum(n == 0 for n in lengths) / len(lengths)
        metrics = {"on_policy": 1.0, "gen_tokens": float(np.mean(lengths)), "gen_empty_rows": empty}
        if empty == 1.0:
            self.empty_batches += 1
            logger.warning(
                "step %d: no row of the on-policy batch generated a token (the student stopped at once); "
                "trained off-policy instead (%d such batch(es) so far)",
                step,
                self.empty_batches,
            )
            return {**inputs, "policy_metrics": {**metrics, "on_policy": 0.0}}
        return {**batch, "policy_metrics": metrics, **({} if self.args.on_policy_ce else {"ce_weight": 0.0})}
