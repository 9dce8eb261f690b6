"""The paper scale: real checkpoints, a real pre-training stream, the paper's optimizer and schedule.

The same trainer (`xtoken.train.XTokenTrainer`), losses and grid of settings as the miniature; only the
inputs change (`PaperConfig`, every field with its help):

    student  meta-llama/Llama-3.2-1B          (gated: accept the licence on the model page, `hf auth login`)
    teachers meta-llama/Llama-3.2-3B (KL), Qwen/Qwen3-4B, microsoft/Phi-4-mini-instruct (GOLD / P-KL / H-KL)
    data     nvidia/Nemotron-Pretraining-Specialized-v1.1, packed into consecutive 2,048-token samples
    optim    AdamW lr 5e-5, weight decay 0.001, betas (0.9, 0.95), 250 warm-up steps then cosine to 0,
             global batch 64 on any number of GPUs, 5,000 steps, student in fp32 master weights with bf16
             autocast, teachers in bf16, temperature 1, dynamic KD/CE scaling on
    eval     lm-eval: PAPER_TASKS below, each with its own number of shots

One run per (setting, seed), each in its own folder ``<work>/runs/<setting>/seed<k>/``:

    trainer/checkpoint-*        the Trainer's checkpoints (``save_total_limit`` kept); a rerun resumes there
    model/                      the trained student and its tokenizer
    lm_eval_results.json        lm-eval's raw results
    result.json                 scores per task, the final losses, and the run record (setting, seed, W
                                digests, package versions, wall time, tokens/s, peak memory per rank)

A run whose ``result.json`` exists is read back, never retrained. `run_grid` runs a list of settings
in-process on one device, or each under ``torchrun --nproc_per_node N`` (``PaperConfig.nproc_per_node``);
``python -m xtoken.paper`` is that per-run entry point (see `main`). `xtoken.standins` builds random-weight
stand-ins of the three checkpoints, a local corpus and local tasks, so the whole path runs offline on a CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = ["PAPER", "PAPER_TASKS", "TASK_METRICS", "PaperConfig", "HubUnavailable", "load_causal_lm",
           "load_text_stream", "packed_stream", "projection_for", "preflight", "run_setting", "run_grid",
           "task_scores", "paper_config", "grid_config", "prepare"]

PAPER = {
    "student": "meta-llama/Llama-3.2-1B",
    "teachers": {"llama": "meta-llama/Llama-3.2-3B", "qwen3": "Qwen/Qwen3-4B", "phi": "microsoft/Phi-4-mini-instruct"},
    "dataset": "nvidia/Nemotron-Pretraining-Specialized-v1.1",
}
# The paper averages five benchmarks without naming them; GSM8k is one. This list (GSM8k plus four standard
# lm-eval knowledge/reasoning tasks, with their customary numbers of shots) is a parameter, not a claim.
PAPER_TASKS = {"gsm8k": 5, "mmlu": 5, "arc_challenge": 25, "hellaswag": 10, "winogrande": 5}
# The number each task contributes to the tables: (lm-eval metric, filter).
TASK_METRICS = {"gsm8k": ("exact_match", "strict-match"), "mmlu": ("acc", "none"),
                "arc_challenge": ("acc_norm", "none"), "hellaswag": ("acc_norm", "none"),
                "winogrande": ("acc", "none"), "xtoken_standin_gsm8k": ("exact_match", "strict-match"),
                "xtoken_standin_arc": ("acc_norm", "none")}


@dataclass
class PaperConfig:
    """Everything a paper-scale run reads. ``PaperConfig.preset("paper")`` is the paper's setup;
    ``preset("standin")`` the same path at toy sizes for the random-weight stand-ins (`xtoken.standins`)."""
    student: str = field(default=PAPER["student"], metadata={"help": "student checkpoint: hub id or local folder"})
    teachers: dict = field(default_factory=lambda: dict(PAPER["teachers"]), metadata={
        "help": "teacher key (as used by the settings) -> hub id or local folder"})
    projections: dict = field(default_factory=dict, metadata={
        "help": "teacher key -> a W file to use (checked against the tokenizers before any model loads); "
                "teachers not listed get W built once and cached in <work>/projections"})
    dataset: str = field(default=PAPER["dataset"], metadata={
        "help": "training text: a hub dataset id, or a local .jsonl / .json / .parquet / .txt file or folder of them"})
    subset: str | None = field(default=None, metadata={"help": "the dataset's configuration (subset) name"})
    split: str = field(default="train", metadata={"help": "the dataset split to stream"})
    text_column: str = field(default="text", metadata={"help": "the column holding the text"})
    steps: int = field(default=5000, metadata={"help": "optimizer steps per run"})
    global_batch: int = field(default=64, metadata={
        "help": "samples per optimizer step over all processes (micro_batch x accumulation x world size)"})
    micro_batch: int = field(default=1, metadata={"help": "samples per process per forward"})
    max_length: int = field(default=2048, metadata={"help": "student tokens per packed training sample"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.001, metadata={"help": "AdamW weight decay"})
    betas: tuple = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=250, metadata={"help": "linear warm-up steps, then cosine to 0"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both sides in KD"})
    projection_lr: float = field(default=1e-2, metadata={
        "help": "learning rate of a learned W's rows (settings with learn_projection; same schedule as the model's)"})
    dynamic_kd_scale: bool = field(default=True, metadata={"help": "KD rescaled to CE's value each step (the paper's)"})
    bf16: bool = field(default=True, metadata={
        "help": "student: fp32 master weights with bf16 autocast (Trainer's bf16=True); teachers in bf16"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute the student's activations"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept per run (a 1B checkpoint is ~15 GB)"})
    logging_steps: int = field(default=10, metadata={"help": "log losses every N steps"})
    tasks: dict = field(default_factory=lambda: dict(PAPER_TASKS), metadata={
        "help": "lm-eval task -> number of shots"})
    task_data_dir: str | None = field(default=None, metadata={
        "help": "folder of the local task files (xtoken_* tasks only; lm-eval's own tasks fetch their data)"})
    eval_limit: int | None = field(default=None, metadata={"help": "documents per task (None: all)"})
    eval_batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})
    nproc_per_node: int = field(default=1, metadata={
        "help": "processes per run when run_grid launches it: 1 runs in this process, N > 1 under torchrun"})
    fsdp: str = field(default="", metadata={
        "help": "Trainer's fsdp option for the student (e.g. 'full_shard auto_wrap'); '' = DDP"})
    offline: bool = field(default=False, metadata={"help": "never touch the Hub (HF_HUB_OFFLINE=1)"})
    seeds: tuple = field(default=(0,), metadata={"help": "seeds of the grid (each setting runs once per seed)"})

    @classmethod
    def preset(cls, name: str = "paper", **overrides) -> "PaperConfig":
        """``paper``: the paper's setup. ``standin``: 2 steps, 128-token samples, global batch 2, the
        stand-ins' local corpus and tasks (paths under ``overrides["root"]``, see `xtoken.standins`)."""
        if name == "paper":
            cfg = cls()
        elif name == "standin":
            root = Path(overrides.pop("root", "standins"))
            cfg = cls(dataset=str(root / "corpus"), steps=2, global_batch=2, micro_batch=1, max_length=128,
                      warmup_steps=0, save_steps=1, logging_steps=1,
                      tasks={"xtoken_standin_gsm8k": 5, "xtoken_standin_arc": 25},
                      task_data_dir=str(root / "tasks"), eval_limit=4, eval_batch_size=4, offline=True)
        else:
            raise ValueError(f"unknown preset {name!r}: 'paper' or 'standin'")
        for k, v in overrides.items():
            if k not in {f.name for f in fields(cls)}:
                raise TypeError(f"PaperConfig has no field {k!r}")
            setattr(cfg, k, v)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "max_length", "save_total_limit", "nproc_per_node"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PaperConfig.{name} must be >= 1, not {getattr(self, name)!r}")
        if not (self.temperature > 0 and self.lr >= 0):
            raise ValueError("PaperConfig: temperature must be > 0 and lr >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PaperConfig":
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.95)))
        d["seeds"] = tuple(d.get("seeds", (0,)))
        return cls(**d)

    def accumulation(self, world_size: int) -> int:
        """Gradient accumulation steps that make ``global_batch`` on ``world_size`` processes."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(f"global batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch} "
                             f"x {world_size} processes")
        return self.global_batch // per_step

    def training_args(self, output_dir, *, seed: int = 0, world_size: int | None = None, **overrides):
        """`XTokenConfig` for one run: the paper's optimizer and schedule, accumulation for ``global_batch``
        on the launch's world size (``WORLD_SIZE`` of torchrun / accelerate launch)."""
        import torch

        from .train import XTokenConfig
        world = world_size or launch_world_size()
        cpu = not torch.cuda.is_available()
        kw = dict(output_dir=str(output_dir), max_steps=self.steps, per_device_train_batch_size=self.micro_batch,
                  gradient_accumulation_steps=self.accumulation(world), learning_rate=self.lr,
                  weight_decay=self.weight_decay, adam_beta1=self.betas[0], adam_beta2=self.betas[1],
                  warmup_steps=self.warmup_steps, lr_scheduler_type="cosine", bf16=self.bf16, use_cpu=cpu,
                  temperature=self.temperature, dynamic_kd_scale=self.dynamic_kd_scale, max_length=self.max_length,
                  projection_learning_rate=self.projection_lr,
                  save_steps=self.save_steps, save_total_limit=self.save_total_limit, logging_steps=self.logging_steps,
                  activation_checkpointing=self.gradient_checkpointing, seed=seed, data_seed=seed,
                  # streamed samples are read by every process and split there (each rank its own samples):
                  # accelerate's default would read on rank 0 and dispatch batches, which cannot carry the
                  # collator's alignments
                  accelerator_config={"dispatch_batches": False, "split_batches": False},
                  fsdp=self.fsdp, ddp_find_unused_parameters=False, loss_curve=False, disable_tqdm=False,
                  ddp_backend="gloo" if cpu and launch_world_size() > 1 else None)
        kw.update(overrides)
        return XTokenConfig(**kw)


def launch_world_size() -> int:
    """Processes of this launch: ``WORLD_SIZE`` as torchrun and accelerate launch set it (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def paper_config(output_dir: str, n_gpus: int | None = None, **overrides):
    """`XTokenConfig` of the paper's setup (`PaperConfig().training_args`), kept for scripts."""
    return PaperConfig().training_args(output_dir, world_size=n_gpus, **overrides)


# ---- loading: models, tokenizers, data, W ---------------------------------------------------------

class HubUnavailable(RuntimeError):
    """A paper-scale model or dataset could not be loaded (no Hub, no cache, or no access)."""


def fetch_hint(name: str, kind: str = "model") -> str:
    """The commands that put ``name`` into the local Hugging Face cache (huggingface_hub's ``hf`` CLI)."""
    repo = " --repo-type dataset" if kind == "dataset" else ""
    gated = (f"\n  - {name} is gated: accept its licence on https://huggingface.co/{name} first"
             if name.startswith("meta-llama/") else "")
    return (f"  - `hf auth login` (a token with read access){gated}\n"
            f"  - `hf download {name}{repo}` on a machine with network (or run there directly)")


def _hint(what: str, err: Exception, kind: str = "model") -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    return (f"Could not load {kind} {what!r} ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}).\n"
            f"  {'Offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1) and it is not in the local cache. ' if offline else ''}"
            f"The paper scale needs it from the Hugging Face Hub or a local cache:\n{fetch_hint(what, kind)}\n"
            f"  The default `scale='mini'` runs offline; `make paper-smoke` runs this path on stand-ins.")


def _local_or_hub(name: str) -> str:
    """``name`` unchanged; a path-like name that does not exist is refused with 'no such folder'."""
    p = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not p.exists():
        raise FileNotFoundError(f"no such folder: {name}")
    return str(p) if p.exists() else name


def load_causal_lm(name: str, *, dtype="bfloat16", device_map=None):
    """AutoModelForCausalLM by hub id or local folder. ``device_map={"": device}`` loads the weights straight
    onto that device (no full copy in host memory first). Clear error when it cannot be found."""
    import torch
    from transformers import AutoModelForCausalLM
    name = _local_or_hub(name)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), device_map=device_map)
    except Exception as err:  # hub errors come in many types; the message is what matters
        raise HubUnavailable(_hint(name, err)) from None


def logit_width(name: str) -> int:
    """The model's logit width (``config.vocab_size``) read from its config alone, before any weight loads."""
    from transformers import AutoConfig
    name = _local_or_hub(name)
    try:
        return int(AutoConfig.from_pretrained(name).vocab_size)
    except Exception as err:
        raise HubUnavailable(_hint(name, err)) from None


def load_paper_tokenizer(name: str):
    """The checkpoint's own tokenizer (local folder, or the Hub / its cache); a pad token is set if missing."""
    from .tokenizers import load_tokenizer
    tok = load_tokenizer(_local_or_hub(name))
    if tok.pad_token is None:
        pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in tok.get_vocab() else tok.eos_token
        tok.pad_token = pad
    return tok


_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def load_text_stream(source: str, *, subset: str | None = None, split: str = "train", text_column: str = "text"):
    """A streamed `datasets.IterableDataset` of the texts: a hub dataset id, or a local file / folder of
    .jsonl, .json, .parquet or .txt files (one shard per file, so N processes read disjoint files)."""
    from datasets import load_dataset
    p = Path(source).expanduser()
    if p.exists() or source.startswith(("/", "./", "../", "~")):
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {source}")
        files = sorted(f for f in ([p] if p.is_file() else p.rglob("*")) if f.suffix in _DATA_FORMATS)
        if not files:
            raise FileNotFoundError(f"{source} holds no {', '.join(_DATA_FORMATS)} files")
        kinds = {_DATA_FORMATS[f.suffix] for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{source} mixes file formats {sorted(kinds)}: keep one per folder")
        rows = load_dataset(kinds.pop(), data_files={split: [str(f) for f in files]}, split=split, streaming=True)
    else:
        try:
            rows = load_dataset(source, subset, split=split, streaming=True)
        except Exception as err:
            raise HubUnavailable(_hint(source, err, kind="dataset")) from None
    if rows.column_names is not None and text_column not in rows.column_names:
        raise KeyError(f"{source} has no column {text_column!r} (columns: {rows.column_names}); set text_column")
    return rows


def pack_texts(texts, tokenizer, max_length: int, separator: str = "\n\n", block_chars: int | None = None):
    """Cut a stream of documents into consecutive training samples of ``max_length`` student tokens.

    The documents are joined with ``separator`` and tokenized in blocks (with offsets); each sample is the
    exact text of ``max_length - 1`` consecutive tokens (the collator adds the BOS), so nothing is thrown
    away, and every teacher later sees the same characters (the collator cuts all sides at one character).
    A block's last token may be a word cut by the block's end: it is never put in a sample but re-read at
    the start of the next block. Yields ``{"text": str}``.
    """
    n = max(1, max_length - (1 if tokenizer.bos_token_id is not None else 0))
    block_chars = block_chars or 16 * n * 4
    buf = ""
    for doc in texts:
        buf = f"{buf}{separator}{doc}" if buf else doc
        while len(buf) >= block_chars:
            buf = yield from _emit(buf, tokenizer, n, final=False)
    if buf:
        yield from _emit(buf, tokenizer, n, final=True)


def _emit(text: str, tokenizer, n: int, final: bool):
    """Yield the complete n-token samples of ``text``; return the text left for the next block."""
    offs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                     split_special_tokens=True)["offset_mapping"]
    usable = len(offs) if final else len(offs) - 1          # the last token may continue in the next block
    start = 0
    while start + n <= usable:
        a, b = offs[start][0], offs[start + n - 1][1]
        yield {"text": text[a:b]}
        start += n
    if final:
        return ""
    return text[offs[start][0]:] if start < len(offs) else ""


def packed_stream(rows, tokenizer, max_length: int, *, text_column: str = "text", separator: str = "\n\n"):
    """`pack_texts` over a streamed dataset, as a `datasets.IterableDataset` with one shard per source shard,
    so that accelerate gives each process its own source shards (when there are at least as many)."""
    from datasets import IterableDataset

    def gen(shards):
        for i in shards:
            part = rows.shard(num_shards=rows.n_shards, index=i)
            yield from pack_texts((r[text_column] for r in part), tokenizer, max_length, separator)
    return IterableDataset.from_generator(gen, gen_kwargs={"shards": list(range(rows.n_shards))})


def stream_pretraining_text(name: str = PAPER["dataset"], subset: str | None = None, split: str = "train",
                            text_column: str = "text"):
    """The raw text stream (`load_text_stream`), kept under its earlier name."""
    return load_text_stream(name, subset=subset, split=split, text_column=text_column)


def projection_for(student_tok, teacher_tok, teacher_width: int, cache_dir, path: str | None = None):
    """W for a tokenizer pair with ``teacher_width`` columns (the teacher model's logit width, whatever the
    tokenizer's own length). ``path``: a given W file, checked against the tokenizers. Otherwise built once
    and cached in ``cache_dir`` under the tokenizers' fingerprints (bit-identical on every rebuild)."""
    from .projection import Projection, build_projection
    from .tokenizers import tokenizer_fingerprint
    if path is not None:
        W = Projection.load(path, student_tok, teacher_tok)
        return W if W.teacher_vocab_size == teacher_width else W.with_teacher_width(teacher_width)
    f = Path(cache_dir) / (f"{tokenizer_fingerprint(student_tok)}-{tokenizer_fingerprint(teacher_tok)}"
                           f"-{teacher_width}.safetensors")
    if f.exists():
        return Projection.load(f, student_tok, teacher_tok)
    W = build_projection(student_tok, teacher_tok, teacher_vocab_size=teacher_width)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    W.save(tmp)
    os.replace(tmp, f)
    return W


# ---- settings, checks, one run ----------------------------------------------------------------------

def settings_by_name(names) -> list:
    """The grid's `Setting` objects (the miniature's catalogue) by name; an unknown name is refused."""
    from .mini.experiment import SINGLE_TEACHER_SETTINGS, Setting, multi_teacher_settings
    catalogue = {s.name: s for s in SINGLE_TEACHER_SETTINGS + multi_teacher_settings()}
    out = []
    for n in names:
        if isinstance(n, Setting):
            out.append(n)
        elif n not in catalogue:
            raise KeyError(f"unknown setting {n!r}; known: {', '.join(catalogue)}")
        else:
            out.append(catalogue[n])
    return out


def preflight(cfg: PaperConfig, settings) -> None:
    """Refuse a grid before any model loads: unknown teachers, W files for another tokenizer pair, and
    (offline) every checkpoint or dataset missing from the local cache, all named in one message."""
    from .mini.experiment import Setting
    problems = []
    keys = {k for s in settings for k, _, _ in (s.teachers if isinstance(s, Setting) else [])}
    for k in sorted(keys - set(cfg.teachers)):
        problems.append(f"setting uses teacher {k!r}, which PaperConfig.teachers does not name "
                        f"(known: {', '.join(cfg.teachers)})")
    for k, path in cfg.projections.items():
        if not Path(path).exists():
            problems.append(f"W file of teacher {k!r} not found: {path}")
    if cfg.offline or os.environ.get("HF_HUB_OFFLINE") == "1":
        for name in [cfg.student] + [cfg.teachers[k] for k in sorted(keys & set(cfg.teachers))]:
            if not Path(name).expanduser().exists() and not _in_hub_cache(name):
                problems.append(f"model {name!r} is not in the local cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}):\n"
                                + fetch_hint(name))
        if not Path(cfg.dataset).expanduser().exists() and not _in_hub_cache(cfg.dataset, "dataset"):
            problems.append(f"dataset {cfg.dataset!r} is not a local path nor in the local cache:\n"
                            + fetch_hint(cfg.dataset, "dataset"))
    if problems:
        raise HubUnavailable("the paper-scale grid cannot start:\n- " + "\n- ".join(problems))
    if cfg.projections:      # W files: refused for another tokenizer pair before any model loads
        from .projection import Projection
        s_tok = load_paper_tokenizer(cfg.student)
        for k, path in cfg.projections.items():
            Projection.load(path, s_tok, load_paper_tokenizer(cfg.teachers[k]))


def _in_hub_cache(repo: str, kind: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache
    name = "config.json" if kind == "model" else "README.md"
    hit = try_to_load_from_cache(repo, name, repo_type=kind)
    if isinstance(hit, str):
        return True
    from huggingface_hub.constants import HF_HUB_CACHE
    return kind == "dataset" and (Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}").exists()


def task_scores(df) -> dict:
    """{task: score} from `xtoken.evaluate.evaluate`'s tidy rows, by `TASK_METRICS` (else the first metric)."""
    out = {}
    for task in dict.fromkeys(df.task):
        rows = df[df.task == task]
        metric, filt = TASK_METRICS.get(task, (rows.metric.iloc[0], rows["filter"].iloc[0]))
        hit = rows[(rows.metric == metric) & (rows["filter"] == filt)]
        out[task] = float((hit if len(hit) else rows).value.iloc[0])
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for p in ("xtoken", "torch", "transformers", "accelerate", "datasets", "lm_eval", "tokenizers"):
        try:
            out[p] = version(p.replace("_", "-"))
        except PackageNotFoundError:
            out[p] = None
    return out


def _peak_memory_gb(device) -> float:
    import resource

    import torch
    if getattr(device, "type", str(device)).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20       # Linux: KiB


def _gather(value):
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


class _SeenTexts:
    """A collator wrapper that counts and hashes the samples this process trained on (the run record shows
    that every rank read its own samples)."""

    def __init__(self, collator):
        import hashlib
        self.collator, self.n, self._h = collator, 0, hashlib.sha1()

    def __call__(self, rows):
        for r in rows:
            self.n += 1
            self._h.update(r["text"].encode("utf-8", "surrogatepass") + b"\0")
        return self.collator(rows)

    def digest(self) -> str:
        return self._h.hexdigest()[:16]


def _tensor_sums(model):
    """Per-tensor float64 sums of the parameters (cheap on any device): which tensors changed, and a digest
    that must agree across DDP ranks."""
    import torch
    with torch.no_grad():
        return torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()


def _digest(sums) -> str:
    import hashlib
    return hashlib.sha1(sums.numpy().tobytes()).hexdigest()[:16]


def run_setting(cfg: PaperConfig, setting, seed: int, work_dir) -> dict:
    """One paper-scale run (on every process of a torchrun launch): train, save, evaluate on rank 0.

    Resumable: the Trainer's last checkpoint in ``trainer/`` is resumed; a finished run (``result.json``)
    is read back. Returns the result dict (the same on every rank)."""
    import torch

    from .evaluate import evaluate, save_raw_results
    from .train import Teacher, XTokenTrainer
    (setting,) = settings_by_name([setting])
    out = Path(work_dir) / "runs" / setting.name / f"seed{seed}"
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    if cfg.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    t_start = time.time()
    args = cfg.training_args(out / "trainer", seed=seed, teacher_weighting=setting.weighting,
                             learn_projection=setting.learn_projection)
    # tokenizers and W first: a wrong W or a missing teacher is refused before any model loads
    s_tok = load_paper_tokenizer(cfg.student)
    specs = []
    for key, loss, weight in setting.teachers:
        if key not in cfg.teachers:
            raise KeyError(f"setting {setting.name!r} uses teacher {key!r}, which PaperConfig.teachers does not name")
        t_tok = load_paper_tokenizer(cfg.teachers[key])
        W = None
        if loss != "kl":
            with args.main_process_first(local=False, desc=f"W for {key}"):    # rank 0 builds, the others read
                W = projection_for(s_tok, t_tok, logit_width(cfg.teachers[key]), Path(work_dir) / "projections",
                                   cfg.projections.get(key))
        specs.append((key, loss, weight, t_tok, W))
    student = load_causal_lm(cfg.student, dtype="float32")          # fp32 master weights; bf16 autocast in training
    teacher_dtype = "bfloat16" if cfg.bf16 else "float32"
    teachers = [Teacher(key, load_causal_lm(cfg.teachers[key], dtype=teacher_dtype, device_map={"": args.device}),
                        t_tok, loss=loss, projection=W, weight=float(weight)) for key, loss, weight, t_tok, W in specs]
    rows = load_text_stream(cfg.dataset, subset=cfg.subset, split=cfg.split, text_column=cfg.text_column)
    data = packed_stream(rows, s_tok, cfg.max_length, text_column=cfg.text_column)
    from .train import DistillCollator
    seen = _SeenTexts(DistillCollator(s_tok, teachers, cfg.max_length))
    trainer = XTokenTrainer(model=student, args=args, teachers=teachers, train_dataset=data, processing_class=s_tok,
                            data_collator=seen)
    sums_before = _tensor_sums(student)
    from transformers.trainer_utils import get_last_checkpoint
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    t0 = time.time()
    train_out = trainer.train(resume_from_checkpoint=last)
    train_wall = time.time() - t0
    trainer.save_model(str(out / "model"))
    peak = _gather(round(_peak_memory_gb(args.device), 3))
    sums_after = _tensor_sums(trainer.model)
    moved = float((sums_after != sums_before).float().mean()) if sums_after.shape == sums_before.shape else None
    world = args.world_size
    steps_here = train_out.global_step - (int(str(last).rsplit("-", 1)[-1]) if last else 0)   # resumed: steps of this process
    tokens = steps_here * cfg.global_batch * cfg.max_length
    final = {k: v for r in trainer.state.log_history for k, v in r.items()
             if k in ("loss", "ce", "kd") or k.startswith(("kd_", "alpha_"))}
    record = {"setting": setting.to_dict(), "seed": seed, "world_size": world, "device": str(args.device),
              "accumulation": args.gradient_accumulation_steps, "global_batch": cfg.global_batch,
              "resumed_from": last, "w_digests": {k: W.digest() for k, _, _, _, W in specs if W is not None},
              "versions": _versions(), "train_wall_s": round(train_wall, 2),
              "tokens_per_s": round(tokens / max(train_wall, 1e-9), 1), "peak_memory_gb_per_rank": peak,
              "student_master_dtype": str(next(trainer.model.parameters()).dtype).replace("torch.", ""),
              "changed_tensor_share": moved,       # share of the student's weight tensors that training changed
              "params_digest_per_rank": _gather(_digest(sums_after)) if not cfg.fsdp else None,   # DDP: all equal
              # collated, not trained: accelerate reads one batch ahead to detect the end of the data
              "samples_collated_per_rank": _gather(seen.n), "texts_digest_per_rank": _gather(seen.digest()),
              "config": cfg.to_dict()}
    del trainer, teachers, student
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result = None
    if args.process_index == 0:
        s_tok.save_pretrained(str(out / "model"))
        t1 = time.time()
        df, raw = evaluate(out / "model", cfg.tasks, data_dir=cfg.task_data_dir, limit=cfg.eval_limit,
                           batch_size=cfg.eval_batch_size, device=str(args.device), offline=cfg.offline,
                           dtype="bfloat16" if cfg.bf16 and str(args.device).startswith("cuda") else "float32",
                           return_raw=True)
        save_raw_results(raw, out / "lm_eval_results.json")
        result = {"setting": setting.name, "label": setting.label or setting.name, "seed": seed,
                  **task_scores(df), "final": final, "train_wall_s": record["train_wall_s"],
                  "eval_wall_s": round(time.time() - t1, 2), "wall_s": round(time.time() - t_start, 2),
                  "record": record}
        tmp = out / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, out / "result.json")
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return result if result is not None else json.loads((out / "result.json").read_text())


# ---- the grid -------------------------------------------------------------------------------------

def _launch(cfg: PaperConfig, setting, seed: int, work_dir) -> None:
    """One run under ``torchrun --nproc_per_node N`` (``python -m xtoken.paper``), its output streamed."""
    spec = {"config": cfg.to_dict(), "setting": setting.to_dict(), "seed": seed, "work_dir": str(work_dir)}
    f = Path(work_dir) / "runs" / setting.name / f"seed{seed}" / "launch.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc_per_node}",
           "-m", "xtoken.paper", str(f)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_grid(cfg: PaperConfig, settings, seeds=None, work_dir="runs/paper"):
    """Every (setting, seed) not yet finished, then one row per run as the miniature's grid gives them:
    setting, label, seed, a column per task (fraction correct), final losses, wall times."""
    import pandas as pd
    settings = settings_by_name(settings)
    seeds = cfg.seeds if seeds is None else seeds
    preflight(cfg, settings)
    work = Path(work_dir)
    rows = []
    todo = [(s, seed) for s in settings for seed in seeds]
    for i, (s, seed) in enumerate(todo, 1):
        f = work / "runs" / s.name / f"seed{seed}" / "result.json"
        if not f.exists():
            print(f"[{i}/{len(todo)}] {s.name} seed {seed}", flush=True)
            if cfg.nproc_per_node > 1:
                _launch(cfg, s, seed, work)
            else:
                run_setting(cfg, s, seed, work)
        r = json.loads(f.read_text())
        row = {k: r.get(k) for k in ("setting", "label", "seed")}
        row.update({t: r.get(t) for t in cfg.tasks})
        row.update({f"final_{k}": v for k, v in r.get("final", {}).items() if k in ("ce", "kd") or k.startswith("kd_")})
        row.update({k: r.get(k) for k in ("train_wall_s", "eval_wall_s", "wall_s")})
        row["tokens_per_s"] = r.get("record", {}).get("tokens_per_s")
        rows.append(row)
    return pd.DataFrame(rows)


def grid_config(standin_root=None, **overrides) -> PaperConfig:
    """The notebooks' paper-scale config: the paper's setup, or with ``standin_root`` the stand-ins' (the
    notebook sets ``HF_HOME`` to ``<standin_root>/hf_home`` before importing anything). ``None`` overrides
    are ignored (a notebook parameter left at its default)."""
    overrides = {k: (tuple(v) if k == "seeds" else v) for k, v in overrides.items() if v is not None}
    if standin_root:
        return PaperConfig.preset("standin", root=standin_root, **overrides)
    return PaperConfig.preset("paper", **overrides)


def prepare(cfg: PaperConfig, work_dir) -> dict:
    """What the grid's tables need besides the runs: the teachers (key, checkpoint, logit width) and the
    "no distillation" row, the student checkpoint scored as it is (once; ``<work>/base/result.json``)."""
    import pandas as pd

    from .evaluate import evaluate, save_raw_results
    if cfg.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    teachers = pd.DataFrame([{"teacher": k, "checkpoint": v, "logit width": logit_width(v)}
                             for k, v in cfg.teachers.items()])
    f = Path(work_dir) / "base" / "result.json"
    if not f.exists():
        import torch
        t0 = time.time()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        df, raw = evaluate(_local_or_hub(cfg.student), cfg.tasks, data_dir=cfg.task_data_dir, limit=cfg.eval_limit,
                           batch_size=cfg.eval_batch_size, device=device, offline=cfg.offline,
                           dtype="bfloat16" if cfg.bf16 and device == "cuda" else "float32", return_raw=True)
        save_raw_results(raw, f.parent / "lm_eval_results.json")
        f.write_text(json.dumps({"setting": "base", "label": "base student (no distillation)", **task_scores(df),
                                 "eval_wall_s": round(time.time() - t0, 2)}, indent=1))
    return {"teachers": teachers, "base": json.loads(f.read_text())}


def main(argv=None) -> int:
    """``python -m xtoken.paper LAUNCH.json``: one run on this process (torchrun starts one per GPU)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m xtoken.paper LAUNCH.json   (written by xtoken.paper.run_grid)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    from .mini.experiment import Setting
    run_setting(PaperConfig.from_dict(spec["config"]), Setting.from_dict(spec["setting"]), int(spec["seed"]),
                spec["work_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
