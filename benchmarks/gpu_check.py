"""The paper-scale GPU check: one command, offline, nothing but the repository.

    python benchmarks/gpu_check.py                 # on a GPU: the real shapes, writes results/gpu_throughput.json
    python benchmarks/gpu_check.py --reduced --out /tmp/check.json     # the same code at toy widths (CPU, CI)

Random-weight models of the paper's architectures (published configs: Llama-3.2-1B student; Llama-3.2-3B,
Qwen3-4B and Phi-4-mini-instruct teachers; the real vocabularies and logit widths), sequence 2048, batch 1,
the student in fp32 master weights under bf16 autocast (Trainer ``bf16=True``), teachers in bf16. One
`XTokenTrainer` optimizer step each of:

    ce     continued pre-training (no teacher)
    kl     Llama-3.2-3B teacher (same tokenizer)
    p_kl   Qwen3-4B teacher, W built against its 151,936 logits
    gold   Qwen3-4B teacher (GOLD's hybrid loss, the baseline)
    h_kl   Phi-4-mini teacher, W against its 200,064 logits
    p_kl_on_policy   the P-KL step on-policy (``lmbda=1``): the student samples up to 256 tokens (32 reduced)
           after a 256-token prompt (GSM8k's questions with five shots are about that long), the Qwen3-4B teacher
           scores its text; random weights rarely stop early, so rows generate about the whole budget

Per setting: median step time over the timed steps, student tokens/s, peak GPU memory, the KD loss's share of
the step (the loss op alone, forward + backward on the step's logits, over the step time), and MFU (model
FLOPs of the step: 6 N T + 12 L d T^2 for the student, 2 N T + 4 L d T^2 for the teacher's forward, over the
GPU's dense bf16 peak). Text: the stand-in corpus generator (`xtoken.standins`), packed to the sequence.
At the real shapes on one H200 it takes about 2-4 minutes (budget: 8), plus about a minute for the on-policy
step (an estimate: 7 steps of 256 tokens sampled one by one; not yet measured on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train_step import make_trainer, step_once, sync, time_kd_op  # noqa: E402

from xtoken import load_tokenizer  # noqa: E402
from xtoken.projection import build_projection  # noqa: E402
from xtoken.train import DistillCollator, Teacher  # noqa: E402

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense TFLOP/s


def architectures(reduced: bool) -> dict:
    """HF configs of the four models (their published config.json values); reduced: hidden 64, 2 layers."""
    from transformers import LlamaConfig, Phi3Config, Qwen3Config

    rope = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    llama1b = dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_parameters=rope,
        bos_token_id=128000,
        eos_token_id=128001,
    )
    llama3b = dict(llama1b, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128)
    qwen4b = dict(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
    )
    phi4 = dict(
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        bos_token_id=199999,
        eos_token_id=199999,
        pad_token_id=199999,
    )
    cfgs = {"llama1b": llama1b, "llama3b": llama3b, "qwen4b": qwen4b, "phi4": phi4}
    if reduced:
        small = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        cfgs = {k: dict(v, **small, **({"head_dim": 16} if "head_dim" in v else {})) for k, v in cfgs.items()}
    classes = {"llama1b": LlamaConfig, "llama3b": LlamaConfig, "qwen4b": Qwen3Config, "phi4": Phi3Config}
    return {k: classes[k](**v) for k, v in cfgs.items()}


def model_flops(cfg, tokens: int, train: bool) -> float:
    """6 N T + 12 L d T^2 (training) or 2 N T + 4 L d T^2 (forward), N without the embedding table."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", d // cfg.num_attention_heads)
    kv_dim = cfg.num_key_value_heads * getattr(cfg, "head_dim", d // cfg.num_attention_heads)
    per_layer = d * heads_dim + 2 * d * kv_dim + heads_dim * d + 3 * d * cfg.intermediate_size
    n = L * per_layer + d * V  # the LM head is a matmul of every position
    k = 3 if train else 1
    return k * (2 * n * tokens + 4 * L * heads_dim * tokens * tokens)


def texts(n: int, chars: int) -> list[str]:
    import random

    from xtoken.standins import _corpus

    rng = random.Random(0)
    out = []
    for _ in range(n):
        t = ""
        while len(t) < chars:
            t += " ".join(_corpus(rng, 1))
        out.append(t)
    return out


def run(reduced: bool, seq: int, steps: int, warmup: int) -> dict:
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    gpu = torch.cuda.get_device_name() if cuda else None
    peak = next((v for k, v in PEAK_BF16.items() if gpu and k in gpu), None)
    cfgs = architectures(reduced)
    toks = {
        "llama": load_tokenizer("meta-llama/Llama-3.2-1B"),
        "qwen3": load_tokenizer("Qwen/Qwen3-4B"),
        "phi": load_tokenizer("microsoft/Phi-4-mini-instruct"),
    }
    t0 = time.perf_counter()
    W = {
        "qwen3": build_projection(toks["llama"], toks["qwen3"], teacher_vocab_size=cfgs["qwen4b"].vocab_size),
        "phi": build_projection(toks["llama"], toks["phi"], teacher_vocab_size=cfgs["phi4"].vocab_size),
    }
    w_s = time.perf_counter() - t0
    torch.manual_seed(0)
    with torch.device(device):
        student = AutoModelForCausalLM.from_config(cfgs["llama1b"], dtype=torch.float32)  # fp32 master weights
        teacher_models = {
            k: AutoModelForCausalLM.from_config(cfgs[c], dtype=torch.bfloat16).eval()
            for k, c in (("llama3b", "llama3b"), ("qwen4b", "qwen4b"), ("phi4", "phi4"))
        }
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    settings = [
        ("ce", None, None),
        ("kl", Teacher("llama3b", teacher_models["llama3b"], toks["llama"], "kl"), "llama3b"),
        ("p_kl", Teacher("qwen4b", teacher_models["qwen4b"], toks["qwen3"], "p_kl", projection=W["qwen3"]), "qwen4b"),
        ("gold", Teacher("qwen4b", teacher_models["qwen4b"], toks["qwen3"], "gold", projection=W["qwen3"]), "qwen4b"),
        ("h_kl", Teacher("phi4", teacher_models["phi4"], toks["phi"], "h_kl", projection=W["phi"]), "phi4"),
    ]
    corpus = texts(warmup + steps, chars=seq * 6)
    out = {
        "mode": "reduced shapes" if reduced else "paper shapes",
        "device": device,
        "gpu": gpu,
        "sequence": seq,
        "batch": 1,
        "student": "fp32 master weights, bf16 autocast",
        "teachers": "bf16",
        "torch": torch.__version__,
        "w_build_s": round(w_s, 2),
        "peak_bf16_flops": peak,
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, teacher, arch in settings:
            teachers = [teacher] if teacher else []
            col = DistillCollator(toks["llama"], teachers, max_length=seq)
            batches = [col([{"text": t}]) for t in corpus]
            student.load_state_dict(state)
            tr = make_trainer(student, toks["llama"], teachers, tmp, bf16=True, max_length=seq)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times = [step_once(tr, b) for b in batches]
            step = statistics.median(times[warmup:])
            mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            n_s = int(batches[0]["attention_mask"].sum())
            flops = model_flops(cfgs["llama1b"], n_s, train=True)
            r = {"step_s": round(step, 4), "tokens_per_s": round(n_s / step, 1), "peak_gib": mem and round(mem, 2)}
            if teacher is not None:
                n_t = int(batches[0]["teachers"][teacher.name]["attention_mask"].sum())
                flops += model_flops(cfgs[arch], n_t, train=False)
                loss_s = time_kd_op(teacher, batches, cfgs["llama1b"].vocab_size, device, warmup=warmup)
                r["loss_s"] = round(loss_s, 4)
                r["loss_share"] = round(loss_s / step, 3)
            r["mfu"] = round(flops / step / peak, 4) if peak else None
            out["results"][name] = r
            print(
                f"  {name:5s} {step * 1e3:9.1f} ms/step  {r['tokens_per_s']:9.0f} tok/s"
                + (f"  peak {mem:.1f} GiB" if mem else "")
                + (f"  loss share {r['loss_share']:.2f}" if "loss_share" in r else "")
                + (f"  MFU {r['mfu']:.3f}" if r["mfu"] is not None else ""),
                flush=True,
            )
            del tr
            sync()
        out["results"]["p_kl_on_policy"] = on_policy_step(
            student,
            state,
            settings[2][1],
            toks["llama"],
            corpus,
            tmp,
            seq,
            warmup,
            new_tokens=32 if reduced else 256,
            prompt_tokens=min(256, seq // 2),
        )
    ce = out["results"]["ce"]["step_s"]
    for r in out["results"].values():
        r["step_vs_ce"] = round(r["step_s"] / ce, 3)
    return out


def on_policy_step(student, state, teacher, tok, corpus, tmp, seq, warmup, new_tokens, prompt_tokens=256) -> dict:
    """Median step time of on-policy P-KL (`XTokenTrainer` with ``lmbda=1``) on prompts of ``prompt_tokens``
    student tokens (with the BOS), with the student's generated tokens per row and the peak memory."""
    col = DistillCollator(tok, [teacher], max_length=seq)
    col.keep_prompts = True
    prompts = [tok.decode(tok(t, add_special_tokens=False).input_ids[: prompt_tokens - 1]) for t in corpus]
    batches = [col([{"text": p}]) for p in prompts]
    student.load_state_dict(state)
    tr = make_trainer(student, tok, [teacher], tmp, bf16=True, max_length=seq, lmbda=1.0, max_new_tokens=new_tokens)
    generated, prepare = [], tr.on_policy.prepare

    def recording(model, inputs, step):
        batch = prepare(model, inputs, step)
        generated.append(batch["policy_metrics"].get("gen_tokens", 0.0))
        return batch

    tr.on_policy.prepare = recording
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = statistics.median([step_once(tr, b) for b in batches][warmup:])
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    r = {
        "step_s": round(step, 4),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": new_tokens,
        "gen_tokens_per_row": round(statistics.median(generated[warmup:]), 1),
        "peak_gib": mem and round(mem, 2),
    }
    print(f"  on-policy p_kl {step * 1e3:9.1f} ms/step  {r['gen_tokens_per_row']:.0f} tokens generated", flush=True)
    del tr
    sync()
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reduced", action="store_true", help="toy widths (hidden 64, 2 layers), real vocabularies")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 256 when reduced)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    p.add_argument("--out", default=None, help="JSON output (default results/gpu_throughput.json on a GPU)")
    args = p.parse_args(argv)
    reduced = args.reduced or not torch.cuda.is_available()
    if reduced and not args.reduced:
        print("no CUDA device: running the reduced shapes on the CPU", flush=True)
    seq = args.seq or (256 if reduced else 2048)
    t0 = time.perf_counter()
    out = run(reduced, seq, args.steps, args.warmup)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    path = Path(args.out) if args.out else (ROOT / "results" / "gpu_throughput.json" if not reduced else None)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path} ({out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
