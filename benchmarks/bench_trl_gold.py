"""On-policy step time, side by side: TRL 1.16.0's `GOLDTrainer` (ULD hybrid) and `XTokenTrainer` (lmbda=1).

The same random tiny models (bench_onpolicy.tiny_models: a Llama student over the real Llama-3.2 tokenizer, a
Qwen3 teacher over the real Qwen3 tokenizer, hidden 32 / one layer), the same prompts, the same sampling
(temperature 1, no top-p/top-k, 32 new tokens), learning rate 0 (the student never changes, so every round
generates the same tokens), KD only (no CE term on either side). One step = ``training_step`` (generation, the
teacher's tokenization and alignment of the student's text, both forwards, the loss, backward) + the
optimizer step, timed round-robin in one process; medians over the rounds.

  trl_gold   GOLDTrainer(use_uld_loss=True, uld_use_hybrid_loss=True, lmbda=1, beta=0): TRL's
             DataCollatorForChatML batch (a pass-through chat template: the prompt text itself), one on-policy
             generation per step in `_fill_buffer`, ULDLoss hybrid with its default weights
  ours_gold  XTokenTrainer, teacher loss "gold" (common set: W's strict 1-to-1 rows)
  ours_h_kl  XTokenTrainer, teacher loss "h_kl" (common set: each student id's top-1 teacher id under W)

Needs trl (``pip install trl==1.16.0``, in the project's dev extras); without it, prints a message and exits 0.

    python benchmarks/bench_trl_gold.py [--rounds 5] [--record "MACHINE"]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_onpolicy import PROMPTS, SEED, append_measurements, make_trainer, tiny_models  # noqa: E402

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt text as it is
NEW_TOKENS = 32


def trl_trainer(student, teacher, s_tok, t_tok, prompts, tmp: Path):
    """A GOLDTrainer on ``prompts``, on-policy every step, and its first (collated) batch."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    for name, tok in (("student", s_tok), ("teacher", t_tok)):  # ULD loads the teacher tokenizer from a path
        tok = copy.deepcopy(tok)
        tok.chat_template = TEMPLATE
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(tmp / name)
    rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": ""}] for p in prompts]
    args = GOLDConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=len(prompts),
        max_steps=1,
        learning_rate=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10**9,
        lmbda=1.0,
        beta=0.0,  # the matched term: KL(teacher || student), as our forward direction
        max_completion_length=NEW_TOKENS,
        max_length=128,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        use_uld_loss=True,
        uld_use_hybrid_loss=True,
        teacher_tokenizer_name_or_path=str(tmp / "teacher"),
    )
    trainer = GOLDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"messages": rows}),
        processing_class=AutoTokenizer.from_pretrained(tmp / "student"),
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer, next(iter(trainer.get_train_dataloader()))


def step(trainer, batch) -> tuple[float, float]:
    """(seconds, loss) of one training step + optimizer step."""
    t0 = time.perf_counter()
    loss = trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    if not hasattr(trainer, "uld_loss_fn"):  # XTokenTrainer: its per-step metrics are not kept
        trainer._metrics.clear()
    return seconds, float(loss)


def run(args) -> dict:
    from xtoken import load_tokenizer
    from xtoken.projection import build_projection
    from xtoken.train import Teacher

    torch.set_num_threads(1)
    s_tok, t_tok = load_tokenizer("llama"), load_tokenizer("qwen3")
    W = build_projection(s_tok, t_tok)
    student, teacher = tiny_models()
    prompts = PROMPTS[: args.batch]
    kw = dict(lmbda=1.0, max_new_tokens=NEW_TOKENS, max_length=128, ce_weight=0.0, dynamic_kd_scale=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trl, trl_batch = trl_trainer(copy.deepcopy(student), copy.deepcopy(teacher), s_tok, t_tok, prompts, tmp)
        setups = {"trl_gold": (trl, trl_batch)}
        for loss in ("gold", "h_kl"):
            t = Teacher("qwen", teacher, t_tok, loss, projection=W)
            ours = make_trainer(copy.deepcopy(student), s_tok, [t], tmp / loss, **kw)
            setups[f"ours_{loss}"] = (ours, ours.data_collator([{"text": p, "idx": i} for i, p in enumerate(prompts)]))
        times: dict[str, list[float]] = {k: [] for k in setups}
        losses: dict[str, float] = {}
        for r in range(args.warmup + args.rounds):
            for name, (trainer, batch) in setups.items():
                torch.manual_seed(SEED)
                seconds, losses[name] = step(trainer, batch)
                if r >= args.warmup:
                    times[name].append(seconds)
        done = trl._buffered_inputs[0]
        trl_gen = float((done["attention_mask"].sum(1) - done["prompt_attention_mask"].sum(1)).float().mean())
    m = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n== on-policy step, {len(prompts)} prompts, {NEW_TOKENS} new tokens (medians of {args.rounds} rounds) ==")
    for k, v in m.items():
        print(f"  {k:10s} {v * 1e3:8.1f} ms   loss {losses[k]:+.4f}   {v / m['ours_gold']:.2f}x ours_gold")
    print(f"  TRL generated {trl_gen:.1f} tokens per row")
    out = {"ms": {k: v * 1e3 for k, v in m.items()}, "losses": losses, "trl_generated": trl_gen}
    if args.record:
        cmd = f"python benchmarks/bench_trl_gold.py --rounds {args.rounds} --batch {args.batch}"
        rows = [(f"on-policy step {k}", f"{v * 1e3:.0f}", "ms") for k, v in m.items()]
        rows += [(f"trl_gold / {k} on-policy step", f"{m['trl_gold'] / m[k]:.2f}", "x") for k in m if k != "trl_gold"]
        append_measurements(rows, args.record, cmd)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help=f"prompts per step (at most {len(PROMPTS)})")
    p.add_argument("--record", metavar="MACHINE", help="append the figures to measurements.csv, this machine")
    args = p.parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        print("bench_trl_gold: trl is not installed (pip install trl==1.16.0); skipped")
        return None
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return run(args)


if __name__ == "__main__":
    main()
