"""The trainer: distil one or more teachers into a student with the Hugging Face `Trainer`.

The integration, one job per file of `xtoken.hf`:

    config.py    XTokenConfig      TrainingArguments + the distillation knobs (temperature, weights, scaling)
    teacher.py   Teacher           a frozen teacher: model, tokenizer, loss name, projection W, weight
    collator.py  DistillCollator   text or chat rows -> student ids/labels + each teacher's ids and chunk alignments
    cache.py     TeacherCache      a teacher's log-probabilities over a fixed dataset, computed once (optional)
    onpolicy.py  OnPolicy          lmbda > 0: batches of the student's own generations, the prompt masked
    chat_onpolicy.py               the same for chat rows: the student's end-of-turn kept, paired per teacher
    trainer.py   teacher_kd_loss   the ONE place that calls xtoken.losses (dispatch on Teacher.loss)
                 XTokenTrainer     Trainer whose compute_loss is  ce_weight * CE + kd_weight * scale * KD
                 LossCurveCallback writes loss_curve.png at the end of training

Everything else (optimizer, schedule, gradient accumulation, mixed precision, checkpoints and
resume, DDP/FSDP) is the Hugging Face Trainer's and Accelerate's own machinery, untouched.
Teachers are plain attributes of the trainer, never of the model: they are not in the optimizer
and not in checkpoints.

Learned W (``learn_projection=True``): each P-KL teacher's W becomes a
`xtoken.learned_projection.LearnableProjection` (fixed pattern, softmax rows). Its parameters are a separate
optimizer group with their own learning rate (no weight decay, not clipped with the model), get
their gradient only from P-KL, are averaged over DDP ranks before each optimizer step, and are
saved next to every checkpoint as ``learned_W_<teacher>.safetensors`` (the W file format, kind
"learned"); ``train(resume_from_checkpoint=...)`` restores them.

One step, per micro-batch:

    student logits  = student(input_ids)                                   (one forward, with grad)
    CE              = cross-entropy of the student on its own next tokens  (labels, pad = -100)
    for teacher m:  teacher log-probs = teacher(teacher ids) under no_grad, or rows of its cache
                    KD_m = teacher_kd_loss(m, ...)   (kl | gold | p_kl | h_kl | uld)
    KD              = sum_m alpha_m KD_m   (alpha: static weights or confidence-adaptive)
    loss            = ce_weight * CE + kd_weight * KD * stopgrad(CE / KD)  if dynamic_kd_scale
                      ce_weight * CE + kd_weight * KD                       otherwise
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .collator import DistillCollator, unpaired_share, wants_chat
from .config import XTokenConfig
from .onpolicy import OnPolicy, check_setup
from .teacher import NonFiniteTeacher, Teacher, check_finite

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training stopped: a teacher's logits or the training loss were not finite (see
    ``XTokenConfig.nonfinite_teacher``)."""


def teacher_kd_loss(
    teacher: Teacher,
    student_logits: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_mask: torch.Tensor,
    alignments,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    projection_weights: torch.Tensor | None = None,
    metrics: bool = True,
) -> tuple[torch.Tensor, dict]:
    """KD loss of one teacher on one batch; the only place that knows `xtoken.losses`' signatures.

    ``student_logits`` [B, L, V_S] with grad; ``teacher_logits`` [B, L_m, V_m] (logits, or cached
    log-probs: the same after log_softmax), no grad; ``alignments`` from the collator (None for kl);
    ``projection_weights``: a learned W's current weights (P-KL only); ``metrics=False``: the loss's
    diagnostic metrics are skipped (only loss and counts).
    Returns (scalar loss, metrics dict of floats).
    """
    from .. import losses

    # like HF's own causal-LM loss: the loss math runs in float32 whatever the models' dtype (bf16 / fp16
    # logits lose the small probabilities KD compares; teacher and student may also differ in dtype)
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    kw = {"temperature": temperature, "metrics": metrics}
    if chunk_size:
        kw["chunk_size"] = chunk_size
    if teacher.loss == "kl":
        if teacher_logits.shape[1] != student_logits.shape[1]:
            raise ValueError(
                f"teacher {teacher.name!r} uses loss 'kl' but its sequence length differs from the "
                "student's: 'kl' needs the student's tokenizer"
            )
        mask = (student_mask.bool() & teacher_mask.bool()).to(student_logits.device)
        return losses.kl_loss(student_logits, teacher_logits, mask, **kw)
    if alignments is None:
        raise ValueError(f"teacher {teacher.name!r}: loss {teacher.loss!r} needs chunk alignments from the collator")
    if teacher.loss == "uld":
        return losses.uld_loss(student_logits, teacher_logits, alignments, **kw)
    if projection_weights is not None:
        if teacher.loss != "p_kl":
            raise ValueError(f"teacher {teacher.name!r}: a learned W is a P-KL option, not {teacher.loss!r}")
        kw["weights"] = projection_weights
    fn = {"p_kl": losses.p_kl_loss, "h_kl": losses.h_kl_loss, "gold": losses.gold_loss}[teacher.loss]
    return fn(student_logits, teacher_logits, alignments, teacher.projection, **kw)


# ---- the trainer --------------------------------------------------------------------------------


class XTokenTrainer(Trainer):
    """`transformers.Trainer` for X-Token distillation.

    Use like Trainer, plus ``teachers``::

        trainer = XTokenTrainer(model=student, args=XTokenConfig(...), teachers=[Teacher(...)],
                                train_dataset=ds, processing_class=student_tokenizer)
        trainer.train()

    ``data_collator`` defaults to ``DistillCollator(processing_class, teachers, args.max_length)``.
    With no teachers it trains on CE alone (the continued-pre-training baseline).

    With fixed data and frozen teachers, run each teacher once and reuse its outputs::

        ds = ds.add_column("idx", list(range(len(ds))))          # rows addressed by index
        col = DistillCollator(student_tok, [teacher], max_length)
        teacher.cache = TeacherCache.build(teacher, ds, col, path="cache/qwen.npy")   # or .load(path)
        XTokenTrainer(..., teachers=[teacher], train_dataset=ds.select(subset)).train()

    Logged at each logging step (means since the last one, over ranks): ``ce``, ``kd``, ``kd_scale``
    (dynamic scaling; from the micro-batches with KD > 0 only), ``kd_<teacher>``, ``alpha_<teacher>``
    (adaptive weights), ``<teacher>/unpaired_share`` (share of the student's tokens in no chunk pair with
    that teacher: text the two sides spell differently); and every metric the loss returns as
    ``<teacher>/<name>`` (common mass, top-1 agreement, mass lost on empty W rows, ...), computed on the
    micro-batches of the logged step only (they cost a pass over the logits).

    Bad input (training only): teacher logits that are NaN, +inf or all -inf at a position the loss
    reads raise `NonFiniteError` naming teacher, step, batch row and position, or with
    ``nonfinite_teacher="skip"`` drop that optimizer step (``skipped_steps`` in the logs); a non-finite
    training loss always raises. Under DDP every rank takes the same decision.
    """

    def __init__(
        self,
        model=None,
        args: XTokenConfig | None = None,
        teachers: list[Teacher] | None = None,
        data_collator=None,
        processing_class=None,
        callbacks=None,
        **kwargs,
    ):
        if args is None:
            args = XTokenConfig(output_dir="xtoken_out")
        if args.remove_unused_columns:
            raise ValueError(
                "XTokenTrainer needs remove_unused_columns=False: the collator reads the raw 'text' "
                "(and 'idx') columns, which the student's forward signature does not name"
            )
        self.teachers = list(teachers or [])
        if len({t.name for t in self.teachers}) != len(self.teachers):
            raise ValueError("teacher names must be unique")
        if self.teachers and args.teacher_weighting == "static" and not sum(t.weight for t in self.teachers) > 0:
            raise ValueError(
                "static teacher weighting needs a teacher with weight > 0 (Teacher.weight: "
                f"{[t.weight for t in self.teachers]})"
            )
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the student tokenizer) or a data_collator")
            chat = wants_chat(kwargs.get("train_dataset"))  # a 'messages' column: each side's chat template
            data_collator = DistillCollator(processing_class, self.teachers, args.max_length, chat=chat)
        self.on_policy = None  # lmbda > 0: batches drawn on-policy are the student's generations (onpolicy.py)
        if args.lmbda > 0:
            check_setup(args, self.teachers, data_collator)
            self.on_policy = OnPolicy(args, data_collator)
        callbacks = list(callbacks or [])
        if getattr(args, "loss_curve", False):
            callbacks.append(LossCurveCallback())
        callbacks.append(_DropSkippedStep(self))
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        # our compute_loss returns per-micro-batch means; Trainer then divides by the accumulation steps
        self.model_accepts_loss_kwargs = False
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        for t in self.teachers:
            if t.cache is None or args.lmbda > 0:  # on-policy text is new: cached teachers run live on it
                if t.model is None:
                    raise ValueError(f"teacher {t.name!r} has neither a model nor a cache")
                t.model.to(self.args.device)
                if dtype is not None:
                    t.model.to(dtype)
                t.model.eval()
                t.model.requires_grad_(False)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # non-finite input (nonfinite_teacher="skip"): the optimizer step being dropped, how many were, and the
        # micro-batch losses and metrics of the current step (held back until it is known not to be dropped)
        self.skipped_steps = 0
        self._skip_at = -1
        self._skipped_since_log = 0
        self._last_log_step = 0
        self._step_loss_at, self._step_loss = -1, None
        self._pending_at, self._pending = -1, []
        self.learned_projections: dict[str, torch.nn.Module] = {}
        if args.learn_projection:
            from ..learned_projection import LearnableProjection

            self.learned_projections = {
                t.name: LearnableProjection(t.projection).to(self.args.device)
                for t in self.teachers
                if t.loss == "p_kl"
            }
            if not self.learned_projections:
                raise ValueError("learn_projection=True needs at least one teacher with loss 'p_kl'")

    # -- learned W: optimizer group, DDP averaging, checkpoints --
    def create_optimizer(self, model=None):
        """Trainer's optimizer plus one parameter group for the learned W's (own lr, no weight decay)."""
        opt = super().create_optimizer(model)
        params = [p for lp in self.learned_projections.values() for p in lp.parameters()]
        if params and not any(p is params[0] for g in opt.param_groups for p in g["params"]):
            opt.add_param_group({"params": params, "lr": self.args.projection_learning_rate, "weight_decay": 0.0})
            opt.register_step_pre_hook(lambda *_: self._sync_projection_grads(params))
            # Trainer zeroes the model's gradients only (model.zero_grad()): clear W's after each step
            opt.register_step_post_hook(lambda *_: [setattr(p, "grad", None) for p in params])
        return opt

    def _sync_projection_grads(self, params):
        if self._skip_at == self.state.global_step + 1:  # a dropped step: W's gradients are gone too
            return
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad /= self.args.world_size

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The student as Trainer saves it, plus each learned W as ``learned_W_<teacher>.safetensors``."""
        super().save_model(output_dir, _internal_call)
        if self.learned_projections and self.args.should_save:
            out = Path(output_dir or self.args.output_dir)
            for name, lp in self.learned_projections.items():
                lp.save(out / f"learned_W_{name}.safetensors")

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """Trainer's ``train``; resuming also restores each learned W from the checkpoint folder (before the
        optimizer, whose state Trainer restores, is built around the same parameters). ``True``: the last
        checkpoint in ``output_dir``, as Trainer resolves it."""
        path = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        if path:
            for name, lp in self.learned_projections.items():
                f = Path(path) / f"learned_W_{name}.safetensors"
                if f.exists():
                    lp.load_state(f)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    # -- one step --
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step; the loss it reports for a dropped step (nonfinite_teacher="skip") is taken back, so
        the logged ``loss`` and ``train_loss`` average the steps that trained. With lmbda > 0 the batch is first
        made on-policy with probability lmbda (`xtoken.hf.onpolicy.OnPolicy.prepare`)."""
        if self.on_policy is not None:
            inputs = self.on_policy.prepare(self.accelerator.unwrap_model(model), inputs, self.state.global_step + 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        step = self.state.global_step + 1
        if self._skip_at != step:
            if self._step_loss_at != step:
                self._step_loss_at, self._step_loss = step, loss
            else:  # gradient accumulation: the step's running sum
                self._step_loss = self._step_loss + loss
            return loss
        back = -self._step_loss if self._step_loss_at == step else torch.zeros_like(loss)
        self._step_loss_at, self._step_loss = step, torch.zeros_like(loss)
        return back

    def _teacher_logits(self, teacher: Teacher, entry: dict) -> torch.Tensor:
        """The teacher's logits (live, no grad, eval mode) or its cached log-probs, as float32."""
        if "logprobs" in entry:
            return entry["logprobs"].float()
        teacher.model.eval()
        with torch.no_grad():
            return teacher.model(input_ids=entry["input_ids"], attention_mask=entry["attention_mask"]).logits

    def _will_log(self) -> bool:
        """Whether the step being computed ends on a logging step (the loss metrics are needed only then)."""
        if not self.model.training or self.args.logging_strategy != "steps":
            return True  # evaluation, or epoch-wise logging: always
        step = self.state.global_step + 1
        every = int(getattr(self.state, "logging_steps", None) or self.args.logging_steps)  # Trainer resolves ratios
        return (step == 1 and self.args.logging_first_step) or step % max(1, every) == 0

    def _projection_weights(self, teacher: Teacher) -> torch.Tensor | None:
        lp = self.learned_projections.get(teacher.name)
        return None if lp is None else lp.weights()

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, in float32, over ``loss_chunk_size`` positions at a time."""
        if logits.shape[1] < 2:  # no row has a next token (every text empty): zero, still on the graph
            return logits.float().sum() * 0.0
        logits, labels = logits[:, :-1], labels[:, 1:]
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        n = (flat_labels != -100).sum().clamp(min=1)
        step = self.args.loss_chunk_size or flat_labels.numel()
        total = flat_logits.new_zeros((), dtype=torch.float32)
        for a in range(0, flat_labels.numel(), step):
            total = total + F.cross_entropy(
                flat_logits[a : a + step].float(), flat_labels[a : a + step], ignore_index=-100, reduction="sum"
            )
        return total / n

    def _kd_per_sample(self, teacher: Teacher, logits, mask, t_logits, entry) -> tuple[torch.Tensor, dict]:
        """[B] KD losses, one per sample (for per-sample teacher weights): the dispatch on each row."""
        alignments = entry.get("alignments")
        rows, metrics = [], defaultdict(list)
        weights, want_metrics = self._projection_weights(teacher), self._will_log()  # once per batch, not per row
        for b in range(logits.shape[0]):
            loss_b, m_b = teacher_kd_loss(
                teacher,
                logits[b : b + 1],
                mask[b : b + 1],
                t_logits[b : b + 1],
                entry["attention_mask"][b : b + 1],
                None if alignments is None else alignments[b : b + 1],
                self.args.temperature,
                self.args.loss_chunk_size,
                weights,
                want_metrics,
            )
            rows.append(loss_b)
            for k, v in m_b.items():
                metrics[k].append(float(v))
        return torch.stack(rows), {k: float(np.mean(v)) for k, v in metrics.items()}

    def kd_loss(self, inputs: dict, logits: torch.Tensor, metrics: dict, check: bool = False) -> torch.Tensor:
        """sum_m alpha_m KD_m over the teachers (xtoken.multi_teacher), filling ``metrics``.

        alpha: ``teacher_weighting="static"`` -> the Teacher.weight values normalized to sum 1; else
        confidence-adaptive from each teacher's statistics on its own tokens (CE, entropy, max prob),
        per batch, or per sample (``weighting_per="sample"``: each KD_m is then computed per sample).
        ``check``: test each teacher's logits for non-finite values at used positions (`check_finite`).
        Also reports ``<teacher>/unpaired_share``: the share of the student's tokens in no chunk pair.
        """
        from ..multi_teacher import aggregate, teacher_stats, teacher_weights

        scheme, per = self.args.teacher_weighting, self.args.weighting_per
        per_sample = scheme != "static" and per == "sample"
        kd_mask = inputs.get("kd_mask", inputs["attention_mask"])  # on-policy: the generated part only
        kd_terms, stats = [], []
        for t in self.teachers:
            entry = inputs["teachers"][t.name]
            t_logits = self._teacher_logits(t, entry)
            if check:
                check_finite(t, t_logits, entry, inputs, self.state.global_step + 1)
            if per_sample:
                kd_m, m_metrics = self._kd_per_sample(t, logits, kd_mask, t_logits, entry)
            else:
                kd_m, m_metrics = teacher_kd_loss(
                    t,
                    logits,
                    kd_mask,
                    t_logits,
                    entry["attention_mask"],
                    entry.get("alignments"),
                    self.args.temperature,
                    self.args.loss_chunk_size,
                    self._projection_weights(t),
                    self._will_log(),
                )
            kd_terms.append(kd_m)
            if scheme != "static":
                t_labels = entry["input_ids"].masked_fill(entry["attention_mask"] == 0, -100)
                stats.append(teacher_stats(t_logits, t_labels, entry["attention_mask"]))
            metrics[f"kd_{t.name}"] = kd_m.detach().mean()
            if entry.get("alignments"):  # student tokens in no chunk pair: text the two sides spell differently
                share = unpaired_share(entry["alignments"], inputs)  # on-policy: generated part; chat: loss part
                if share is not None:
                    metrics[f"{t.name}/unpaired_share"] = share
            metrics.update({f"{t.name}/{k}": v for k, v in m_metrics.items()})
        if scheme == "static":
            alpha = teacher_weights("static", alphas=[t.weight for t in self.teachers])
        else:
            alpha = teacher_weights(scheme, stats, per=per)
            for t, a in zip(self.teachers, alpha):
                metrics[f"alpha_{t.name}"] = a.mean()
        return aggregate(kd_terms, alpha.to(logits.device))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """ce_weight * CE + kd_weight * KD, KD rescaled to CE's value when dynamic_kd_scale; metrics logged.

        In training, nothing non-finite is trained on: each teacher's logits are checked at the positions
        the loss reads, and a non-finite loss stops training (`_stop_or_skip`)."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs.logits
        ce = self._ce(logits, inputs["labels"])
        metrics = {"ce": ce.detach(), **inputs.get("policy_metrics", {})}
        loss = inputs.get("ce_weight", self.args.ce_weight) * ce  # on-policy batches: 0 unless on_policy_ce
        bad_teacher = None
        if self.teachers:
            try:
                kd = self.kd_loss(inputs, logits, metrics, check=model.training)
            except NonFiniteTeacher as e:
                bad_teacher = e.args[0]
            else:
                metrics["kd"] = kd.detach()
                if self.args.dynamic_kd_scale:
                    from ..losses import dynamic_kd_scale

                    metrics["kd_scale"] = ce.detach() / kd.detach().clamp(min=1e-12)
                    kd = dynamic_kd_scale(ce, kd)
                loss = loss + self.args.kd_weight * kd
        if model.training:  # evaluation losses are not mixed into the training logs
            if self._stop_or_skip(ce, loss, bad_teacher):
                loss = ce * 0.0  # zero gradients (every rank still runs its backward); the step is dropped
            else:
                self._record(metrics)
        return (loss, outputs) if return_outputs else loss

    def _stop_or_skip(self, ce: torch.Tensor, loss: torch.Tensor, bad_teacher: str | None) -> bool:
        """After a training micro-batch: raise `NonFiniteError` for a non-finite loss (always) or for
        non-finite teacher logits (``nonfinite_teacher="raise"``); True when the optimizer step is to be
        dropped (``"skip"``). Under DDP both flags are all-reduced first: every rank takes the same
        decision, so none is left waiting in a collective for one that stopped."""
        step = self.state.global_step + 1
        teacher_here, loss_here = bad_teacher is not None, not bool(torch.isfinite(loss.detach()))
        teacher_any, loss_any = teacher_here, loss_here
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flags = torch.tensor([float(teacher_here), float(loss_here)], device=loss.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            teacher_any, loss_any = (bool(x) for x in flags.tolist())
        if loss_any:
            where = f"(ce {float(ce.detach())}, loss {float(loss.detach())})" if loss_here else "on another rank"
            raise NonFiniteError(
                f"non-finite training loss at step {step} {where}: the student's logits or a loss "
                "term are inf/NaN; stopping instead of training on (check the learning rate, "
                "the data of this step, the precision)"
            )
        if not teacher_any:
            return False
        if self.args.nonfinite_teacher == "raise":
            raise NonFiniteError(
                bad_teacher
                if teacher_here
                else f"non-finite teacher logits at step {step} on another rank (its error names the "
                "teacher and position); stopping on this rank too"
            )
        if self._skip_at != step:
            self._skip_at = step
            self.skipped_steps += 1
            self._skipped_since_log += 1
        logger.warning(
            "%s: step %d skipped (%d step(s) skipped so far)",
            bad_teacher or "non-finite teacher logits on another rank",
            step,
            self.skipped_steps,
        )
        return True

    def _record(self, metrics: dict) -> None:
        """Hold a training micro-batch's metrics until its optimizer step is known not to be dropped.
        ``kd_scale`` (CE / KD) only where KD > 0: a batch with nothing to distil would log CE / 1e-12."""
        values = {k: float(v) for k, v in metrics.items()}
        if "kd_scale" in values and not values["kd"] > 0:
            del values["kd_scale"]
        if self.args.nonfinite_teacher != "skip":  # no step is ever dropped: straight into the log window
            for k, v in values.items():
                self._metrics[k].append(v)
            return
        step = self.state.global_step + 1
        if self._pending_at != step:
            self._flush_metrics()
            self._pending_at = step
        self._pending.append(values)

    def _flush_metrics(self) -> None:
        if self._pending_at != self._skip_at:
            for values in self._pending:
                for k, v in values.items():
                    self._metrics[k].append(v)
        self._pending = []

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each distillation metric since the last log (over DDP ranks too, as Trainer
        does for the loss), then log as Trainer does. With ``nonfinite_teacher="skip"``: ``skipped_steps``
        (so far), and ``loss`` / ``train_loss`` averaged over the steps that trained (NaN when none did)."""
        if "loss" in logs:
            self._flush_metrics()
            if self.args.nonfinite_teacher == "skip":
                n, k = self.state.global_step - self._last_log_step, self._skipped_since_log
                if k:
                    logs["loss"] = logs["loss"] * n / (n - k) if n > k else float("nan")
                logs["skipped_steps"] = self.skipped_steps
                self._skipped_since_log = 0
            self._last_log_step = self.state.global_step
            self._log_metrics(logs)
        if "train_loss" in logs and self.skipped_steps:
            g, k = self.state.global_step, self.skipped_steps
            logs["train_loss"] = logs["train_loss"] * g / (g - k) if g > k else float("nan")
        super().log(logs, start_time)

    def _log_metrics(self, logs: dict) -> None:
        """The means of the metrics since the last log into ``logs``. Under DDP, a metric is pooled over the
        ranks that have it (a key can be missing on a rank: kd_scale of a step without KD, say)."""
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            local = sorted(k for k, v in self._metrics.items() if v)
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
            keys = sorted(set().union(*gathered))
            if keys:
                sums = torch.tensor(
                    [[float(np.sum(self._metrics.get(k, []))), float(len(self._metrics.get(k, [])))] for k in keys],
                    dtype=torch.float64,
                    device=self.args.device,
                )
                torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
                logs.update({k: s / c for k, (s, c) in zip(keys, sums.tolist()) if c > 0})
        elif self._metrics:
            keys = sorted(k for k, v in self._metrics.items() if v)
            values = torch.tensor([float(np.mean(self._metrics[k])) for k in keys], device=self.args.device)
            logs.update(dict(zip(keys, values.tolist())))
        self._metrics.clear()


# ---- callbacks ----------------------------------------------------------------------------------


class _DropSkippedStep(TrainerCallback):
    """Part of XTokenTrainer (``nonfinite_teacher="skip"``): right before the optimizer step of a step with
    non-finite teacher logits, every gradient is dropped (set to None), so the optimizer leaves each
    parameter and its moments as they were; the learning-rate schedule still advances."""

    def __init__(self, trainer: "XTokenTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_log_step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.trainer._skip_at != state.global_step + 1:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
        params += list(model.parameters()) if model is not None else []
        for p in params:
            p.grad = None


class LossCurveCallback(TrainerCallback):
    """At the end of training, plot loss (and ce / kd when logged) against step to output_dir/loss_curve.png."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = [r for r in state.log_history if "loss" in r]
        if not rows:
            return
        from matplotlib.figure import Figure  # not pyplot: no backend switched, no figure left open

        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        for key in ("loss", "ce", "kd"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(Path(args.output_dir).name)
        fig.tight_layout()
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(args.output_dir) / "loss_curve.png", dpi=100)
