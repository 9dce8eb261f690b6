"""Two XTokenTrainer steps under DDP on the CPU (gloo); run by tests/test_train.py and tests/test_onpolicy.py
through torchrun.

    torchrun --nproc_per_node 2 tests/ddp_two_steps.py OUT_DIR ASSETS_DIR [LOSS]

ASSETS_DIR holds what `save_assets` wrote: the two small-vocabulary tokenizers and W. Each rank
writes OUT_DIR/rank{r}.json with its losses and a checksum of the student's parameters after the two
steps; the test checks the ranks agree (DDP averaged the gradients). LOSS "p_kl_onpolicy": P-KL with
lmbda=1.0 (every batch the student's own sampled generations, a live teacher with all 151,936 logits) on
the rows of `prompt_dataset` (a different prompt per row); each rank also records its on-policy decisions
and, per step, the dataset rows and prompts it generated for and the student rows it trained on
(tests/test_onpolicy.py checks that the ranks decided alike on different shards).

Also holds what the tests share: tiny real HF models (hidden 32, one layer) over *small vocabularies*:
the real Llama-3 / Qwen3 tokenizers renumbered (`xtoken.mini.models.restrict_tokenizer`) so that the
ids of the test texts are 0..n-1 (~50 ids each), and W built on the full vocabularies then restricted.
A full 128k-row output layer works too but makes every step ~10x slower.
"""

from __future__ import annotations

import json
import os
import sys

import torch

TEXTS = [
    "Tom has 123 apples and buys 45 more. 123 + 45 = 168. #### 168",
    "A farm had 907 sheep; 88 were sold, so 907 - 88 = 819 remain. #### 819",
    "Lisa reads 12 pages a day for 7 days: 12 * 7 = 84 pages.\n#### 84",
    "The shop sold 250 pens and 3 boxes.  Then 250 + 3 = 253! #### 253",
]


def small_vocab(tok, texts=TEXTS):
    """(renumbered tokenizer, local_to_full): the ids of ``texts`` plus bos/eos/pad become 0..n-1."""
    from xtoken.mini.models import restrict_tokenizer

    keep = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
    for row in tok(list(texts))["input_ids"]:
        keep.update(row)
    return restrict_tokenizer(tok, sorted(keep))


def save_assets(out_dir, s_tok, t_tok, W) -> None:
    """What the torchrun ranks load instead of rebuilding: both tokenizers and W."""
    s_tok.save_pretrained(os.path.join(out_dir, "student_tok"))
    t_tok.save_pretrained(os.path.join(out_dir, "teacher_tok"))
    W.save(os.path.join(out_dir, "W.safetensors"))


def tiny_llama(vocab_size: int = 128256, hidden: int = 32, layers: int = 1, seed: int = 0):
    """A random LlamaForCausalLM, hidden 32, one layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def tiny_qwen(vocab_size: int = 151936, hidden: int = 32, layers: int = 1, seed: int = 1):
    """A random Qwen3ForCausalLM, hidden 32, one layer (151,936 logits: the real Qwen3 padding)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg)


def dataset(n: int = 8):
    from datasets import Dataset

    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    return Dataset.from_dict({"text": texts, "idx": list(range(n))})


def prompt_dataset(n: int = 8):
    """Rows ``prompt`` + ``completion`` = the texts of `dataset`, each prompt a different prefix (the first
    3 + i // 4 words of text i % 4): no two rows share a prompt."""
    from datasets import Dataset

    words = [TEXTS[i % len(TEXTS)].split(" ") for i in range(n)]
    cut = [3 + i // len(TEXTS) for i in range(n)]
    prompts = [" ".join(w[:k]) for w, k in zip(words, cut)]
    completions = [" " + " ".join(w[k:]) for w, k in zip(words, cut)]
    return Dataset.from_dict({"prompt": prompts, "completion": completions, "idx": list(range(n))})


def checksum(model) -> float:
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def w_checksum(weights) -> float:
    """A position-weighted sum of W's weights (differs when any entry moves)."""
    w = weights.detach().double()
    return float((w * torch.arange(1, w.numel() + 1, dtype=torch.float64).view_as(w)).sum())


def main(out_dir: str, assets: str, loss: str = "p_kl") -> None:
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from xtoken.projection import Projection
    from xtoken.train import Teacher, XTokenConfig, XTokenTrainer

    rank = int(os.environ.get("RANK", 0))
    s_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "student_tok"))
    W = Projection.load(os.path.join(assets, "W.safetensors"))
    student = tiny_llama(W.student_vocab_size)
    on_policy = loss.endswith("_onpolicy")
    if loss == "kl":
        teacher = Teacher("llama", tiny_llama(W.student_vocab_size, seed=2), s_tok, "kl")
    elif on_policy:  # the student's text can hold teacher ids outside the small vocabulary: all logits
        t_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "teacher_tok"))
        teacher = Teacher("qwen", tiny_qwen(), t_tok, "p_kl", projection=W)
    else:  # "p_kl_learned": P-KL with a learned W (its gradients must be averaged over the ranks too)
        t_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "teacher_tok"))
        teacher = Teacher("qwen", tiny_qwen(W.teacher_vocab_size), t_tok, loss.replace("_learned", ""), projection=W)
    args = XTokenConfig(
        output_dir=out_dir,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        disable_tqdm=True,
        loss_curve=False,
        seed=0,
        max_length=64,
        learn_projection=loss.endswith("_learned"),
        projection_learning_rate=0.5,
        **(dict(lmbda=1.0, max_new_tokens=6, generation_temperature=1.0) if on_policy else {}),
    )
    trainer = XTokenTrainer(
        model=student,
        args=args,
        teachers=[teacher],
        train_dataset=prompt_dataset(8) if on_policy else dataset(8),
        processing_class=s_tok,
    )
    decisions, shards, prompts, rows = [], [], [], []
    if on_policy:  # record what this rank decided, which rows it generated for, and what it trained on
        decide, prepare = trainer.on_policy.decide, trainer.on_policy.prepare

        def recording_decide(step):
            decisions.append(decide(step))
            return decisions[-1]

        def recording_prepare(model, inputs, step):
            out = prepare(model, inputs, step)
            shards.append(inputs["idx"].tolist())
            prompts.append(list(inputs["prompts"]))
            rows.append([r[m == 1].tolist() for r, m in zip(out["input_ids"], out["attention_mask"])])
            return out

        trainer.on_policy.decide, trainer.on_policy.prepare = recording_decide, recording_prepare
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    ce = [r["ce"] for r in trainer.state.log_history if "ce" in r]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "rank": rank,
                "world_size": trainer.args.world_size,
                "losses": losses,
                "ce": ce,
                "checksum": checksum(trainer.model),
                "teacher_checksum": checksum(teacher.model),
                "w_checksum": sum(w_checksum(lp.weights()) for lp in trainer.learned_projections.values()),
                "decisions": decisions,
                "shards": shards,
                "prompts": prompts,
                "rows": rows,
                "on_policy": [r["on_policy"] for r in trainer.state.log_history if "on_policy" in r],
                "gen_tokens": [r["gen_tokens"] for r in trainer.state.log_history if "gen_tokens" in r],
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
