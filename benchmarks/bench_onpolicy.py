"""Cost of an on-policy step (``XTokenConfig.lmbda=1``) against generation + an off-policy step at equal length.

Target: T_on / (T_gen + T_off) <= 1.15, all three measured in one process, round-robin, medians over rounds:

  T_gen  the student's ``generate`` alone on the prompts (`xtoken.hf.onpolicy.generate`: KV cache, no grad)
  T_off  one off-policy `XTokenTrainer` step (lmbda=0) on the very rows the on-policy step trains on (prompt ids
         + the generated ids, each teacher's tokenization of the text, the alignments), pre-collated as a
         DataLoader would hand them over: equal length on every side
  T_on   one on-policy step (lmbda=1) on the prompts: generation, the teachers' tokenization and alignment of
         the student's text, the prompt masked, the step

Every round reseeds torch before T_gen and T_on, and the optimizer's learning rate is 0, so both generate the
same tokens in every round (checked once). Where T_on goes is measured in the same rounds: ``build`` =
`on_policy_batch` with its generation replaced by the same precomputed tokens (prompt encoding, decoding,
re-tokenization per teacher, alignment, masking) and ``masked step`` = the off-policy trainer's step on the
on-policy batch (the prompt masked). The KV cache: the tokens fed to the student per forward call during an
on-policy step (a hook), and ``generate`` with ``use_cache=False`` over ``use_cache=True`` on a student with
hidden 256 / 4 layers (the tiny student's generation is mostly its head and sampling).

Models: random LlamaForCausalLM (student, the real Llama-3.2 tokenizer, 128,256 logits) and Qwen3ForCausalLM
(teacher, the real Qwen3 tokenizer, 151,936 logits), hidden 32 / one layer as in tests/test_onpolicy.py;
the full Llama -> Qwen3 W; H-KL. Sampling at the config's defaults (temperature 1, no top-p/top-k).

    python benchmarks/bench_onpolicy.py [--rounds 10] [--batch 4] [--new-tokens 32] [--record "MACHINE"]

``--record`` appends the figures to benchmarks/measurements.csv with that machine description.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xtoken import load_tokenizer  # noqa: E402
from xtoken.projection import build_projection  # noqa: E402
from xtoken.train import Teacher, XTokenConfig, XTokenTrainer  # noqa: E402

PROMPTS = [
    "Tom has 123 apples and buys 45 more.",
    "A farm had 907 sheep; 88 were sold, so",
    "Lisa reads 12 pages a day for 7 days:",
    "The shop sold 250 pens and 3 boxes.",
    "A train travels 60 miles per hour for 3 hours, so it covers",
    "Maria bakes 24 cookies and gives away 9.",
    "A box holds 6 rows of 8 eggs, which makes",
    "Sam saved $35 in May and $47 in June;",
]
SEED = 1234
MEASUREMENTS = ROOT / "benchmarks" / "measurements.csv"


def tiny_models():
    """(student, teacher): random Llama (128,256 logits) and Qwen3 (151,936 logits), hidden 32, one layer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=128256, head_dim=16, **common))
    torch.manual_seed(1)
    teacher = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, head_dim=16, tie_word_embeddings=True, **common))
    return student, teacher


def make_trainer(student, tok, teachers, out_dir, **kw) -> XTokenTrainer:
    args = XTokenConfig(
        output_dir=str(out_dir),
        max_steps=1,
        per_device_train_batch_size=1,
        learning_rate=0.0,  # the student stays the same: every round generates the same tokens
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        loss_curve=False,
        logging_steps=10**9,
        seed=0,
        **kw,
    )
    trainer = XTokenTrainer(model=student, args=args, teachers=teachers, processing_class=tok)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step(trainer, batch) -> None:
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._metrics.clear()


def raw_generate(model, ids, mask, new_tokens: int, use_cache: bool) -> torch.Tensor:
    """``model.generate`` on a left-padded batch, sampling, exactly ``new_tokens`` tokens (no stop id)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, use_cache=use_cache, pad_token_id=0
    )
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def tokens_fed(model, fn) -> list[int]:
    """The batch x width of every forward call of ``model`` while ``fn`` runs."""
    fed = []
    hook = model.register_forward_pre_hook(
        lambda mod, a, kw: fed.append(int((kw.get("input_ids") if "input_ids" in kw else a[0]).numel())),
        with_kwargs=True,
    )
    try:
        fn()
    finally:
        hook.remove()
    return fed


def cache_ratio_deeper(prompt_ids: list[list[int]], args, reps: int = 3) -> dict[str, float]:
    """Median seconds of ``generate`` with and without the KV cache, alternating, on a student whose layers
    cost more than its sampling (hidden 256, 4 layers): the tiny student's time is almost all the 128,256-way
    head and sampling, which the cache does not change."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    width = max(len(p) for p in prompt_ids)
    ids = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompt_ids):  # left padding
        ids[b, width - len(p) :], mask[b, width - len(p) :] = torch.tensor(p), 1
    times = {"cache": [], "nocache": []}
    for _ in range(reps + 1):
        for key, use in (("cache", True), ("nocache", False)):
            torch.manual_seed(SEED)
            times[key].append(timed(lambda: raw_generate(model, ids, mask, args.new_tokens, use)))
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def off_policy_rows(student, collator, prompts: list[str], args) -> tuple[dict, list[int]]:
    """The rows an on-policy step trains on, unmasked (an off-policy batch of the same length on every side),
    and the generated lengths. Uses the torch RNG as the on-policy step does."""
    from xtoken.hf import onpolicy as op

    tok = collator.student_tokenizer
    names = [f"{i} of the batch" for i in range(len(prompts))]
    prompts = collator.prepare_texts(prompts, names)
    prompt_ids = op.encode_prompts(tok, prompts, collator.max_length, names)
    budget = min(args.max_new_tokens, collator.max_length - min(len(p) for p in prompt_ids))
    raw = op.generate(student, tok, prompt_ids, budget, args)
    stops, limit = op.stop_ids(tok), len(tok)
    gens = [op.cut_at_stop(g, stops, limit)[: collator.max_length - len(p)] for g, p in zip(raw, prompt_ids)]
    rows = [p + g for p, g in zip(prompt_ids, gens)]
    texts = [t + op.decode_generation(tok, p, g) for t, p, g in zip(prompts, prompt_ids, gens)]
    batch = collator.assemble(rows, collator.teacher_ids(texts, rows, memo=False), None, cached=False, memo=False)
    return batch, [len(g) for g in gens]


def run(args) -> dict:
    from xtoken.hf import onpolicy as op

    torch.set_num_threads(1)
    s_tok, t_tok = load_tokenizer("llama"), load_tokenizer("qwen3")
    W = build_projection(s_tok, t_tok)
    student, t_model = tiny_models()
    teacher = Teacher("qwen", t_model, t_tok, "h_kl", projection=W)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    gen_kw = dict(max_new_tokens=args.new_tokens, max_length=args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        on = make_trainer(copy.deepcopy(student), s_tok, [teacher], Path(tmp) / "on", lmbda=1.0, **gen_kw)
        off = make_trainer(copy.deepcopy(student), s_tok, [teacher], Path(tmp) / "off", **gen_kw)
        col, cfg = on.data_collator, on.args
        on_input = col([{"text": p, "idx": i} for i, p in enumerate(prompts)])  # rows' prompts = their text

        torch.manual_seed(SEED)
        off_batch, lengths = off_policy_rows(on.model, col, prompts, cfg)
        torch.manual_seed(SEED)
        masked, lengths2 = op.on_policy_batch(on.model, col, prompts, [str(i) for i in range(len(prompts))], None, cfg)
        assert lengths == lengths2 and torch.equal(masked["input_ids"], off_batch["input_ids"]), "same generation"
        t_len = off_batch["teachers"]["qwen"]["attention_mask"].sum(1).float().mean().item()
        print(
            f"batch {len(prompts)}, student tokens/row {off_batch['attention_mask'].sum(1).float().mean():.1f} "
            f"(generated {statistics.mean(lengths):.1f}), teacher tokens/row {t_len:.1f}"
        )

        names = [str(i) for i in range(len(prompts))]
        prompt_ids = op.encode_prompts(s_tok, col.prepare_texts(prompts, names), args.max_length, names)
        budget = min(cfg.max_new_tokens, args.max_length - min(len(p) for p in prompt_ids))
        torch.manual_seed(SEED)
        raw = op.generate(on.model, s_tok, prompt_ids, budget, cfg)
        fed = tokens_fed(on.model, lambda: step(on, on_input))

        def build():  # on_policy_batch with its generation replaced by the same tokens, precomputed
            real, op.generate = op.generate, lambda *a, **k: raw
            try:
                op.on_policy_batch(on.model, col, prompts, names, None, cfg)
            finally:
                op.generate = real

        times: dict[str, list[float]] = {}
        for r in range(args.warmup + args.rounds):
            torch.manual_seed(SEED)
            t = {"gen": timed(lambda: op.generate(on.model, s_tok, prompt_ids, budget, cfg))}
            t["off"] = timed(lambda: step(off, off_batch))
            torch.manual_seed(SEED)
            t["on"] = timed(lambda: step(on, on_input))
            t["build"] = timed(build)
            t["masked_step"] = timed(lambda: step(off, masked))
            if r >= args.warmup:
                for k, v in t.items():
                    times.setdefault(k, []).append(v)
    cache = cache_ratio_deeper(prompt_ids, args)
    m = {k: statistics.median(v) for k, v in times.items()}
    ratio = m["on"] / (m["gen"] + m["off"])
    cache_ratio = cache["nocache"] / cache["cache"]
    print(f"\n== on-policy step (CPU, 1 thread; medians of {args.rounds} rounds after {args.warmup} warm-up) ==")
    for k, label in (
        ("gen", "generate (KV cache), T_gen"),
        ("off", "off-policy step at equal length, T_off"),
        ("on", "on-policy step, T_on"),
        ("build", "  of T_on: tokenize + align + mask (no generate)"),
        ("masked_step", "  of T_on: the step on the masked batch"),
    ):
        print(f"  {label:50s} {m[k] * 1e3:8.1f} ms")
    print(f"  T_on / (T_gen + T_off) = {ratio:.3f}  (target <= 1.15: {'met' if ratio <= 1.15 else 'MISSED'})")
    print(
        f"  KV cache: the on-policy step fed the student {fed[0]} tokens in its first generate call and "
        f"{sorted(set(fed[1:-1]))} per call after it ({len(fed) - 2} calls; then the training forward)"
    )
    print(
        f"  generate use_cache=False / use_cache=True, {args.new_tokens} new tokens, student hidden 256 / 4 layers: "
        f"{cache_ratio:.2f}x"
    )
    out = {
        "on_ratio": ratio,
        "cache_ratio": cache_ratio,
        "ms": {k: v * 1e3 for k, v in m.items()},
        "generated": statistics.mean(lengths),
    }
    if args.record:
        record(args, out)
    return out


def record(args, out) -> None:
    cmd = f"python benchmarks/bench_onpolicy.py --rounds {args.rounds} --batch {args.batch}"
    cmd += f" --new-tokens {args.new_tokens}"
    rows = [
        ("T_on / (T_gen + T_off) h_kl", f"{out['on_ratio']:.3f}", "x"),
        ("generate T_gen", f"{out['ms']['gen']:.1f}", "ms"),
        ("off-policy step at equal length T_off", f"{out['ms']['off']:.1f}", "ms"),
        ("on-policy step T_on", f"{out['ms']['on']:.1f}", "ms"),
        ("on-policy tokenize + align + mask", f"{out['ms']['build']:.1f}", "ms"),
        ("generate use_cache=False / use_cache=True", f"{out['cache_ratio']:.2f}", "x"),
    ]
    append_measurements(rows, args.record, cmd)


def append_measurements(rows, machine: str, cmd: str) -> None:
    """Append (figure, value, unit) rows to measurements.csv, dated today, with the machine and the command."""
    today = datetime.date.today().isoformat()
    with MEASUREMENTS.open("a", newline="") as f:
        w = csv.writer(f)
        for figure, value, unit in rows:
            w.writerow([today, machine, cmd, figure, value, unit])
    print(f"appended {len(rows)} rows to {MEASUREMENTS}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--record", metavar="MACHINE", help="append the figures to measurements.csv, this machine")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
