"""Stand-ins for the paper scale: the real model classes and vocabularies at toy widths, offline.

`build_standins(root)` writes everything a paper-scale run reads, so that `xtoken.paper` runs unchanged on a
CPU with no network; the only differences from a real run are the models' widths (random weights), the data
and the task files:

    root/hf_home/hub/models--meta-llama--Llama-3.2-1B/...   a Hugging Face cache, under the real hub ids:
    root/hf_home/hub/models--meta-llama--Llama-3.2-3B/...     LlamaForCausalLM (128,256 logits),
    root/hf_home/hub/models--Qwen--Qwen3-4B/...               Qwen3ForCausalLM (151,936),
    root/hf_home/hub/models--microsoft--Phi-4-mini-instruct/  Phi3ForCausalLM (200,064), each with the exact
                                                              offline tokenizer of `xtoken.tokenizers`
    root/corpus/part-0000.jsonl ...                           a small local text corpus (4 shards)
    root/tasks/standin_*.jsonl                                data of the local lm-eval tasks
                                                              xtoken_standin_gsm8k / xtoken_standin_arc

Point ``HF_HOME`` at ``root/hf_home`` with ``HF_HUB_OFFLINE=1`` (`activate`) and the hub ids resolve there.
Deterministic: the same seed gives the same files (weights from a seeded generator, a fixed commit hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

__all__ = ["STANDIN_MODELS", "build_standins", "activate", "standin_paths", "paper_smoke", "SMOKE_PARAMETERS"]

# hub id -> (transformers config class, its real-vocabulary fields); widths are set in `_config`
STANDIN_MODELS = {
    "meta-llama/Llama-3.2-1B": (
        "LlamaConfig",
        dict(
            vocab_size=128256, bos_token_id=128000, eos_token_id=128001, rope_theta=500000.0, tie_word_embeddings=True
        ),
    ),
    "meta-llama/Llama-3.2-3B": (
        "LlamaConfig",
        dict(
            vocab_size=128256, bos_token_id=128000, eos_token_id=128001, rope_theta=500000.0, tie_word_embeddings=True
        ),
    ),
    "Qwen/Qwen3-4B": (
        "Qwen3Config",
        dict(
            vocab_size=151936, bos_token_id=151643, eos_token_id=151645, rope_theta=1000000.0, tie_word_embeddings=True
        ),
    ),
    "microsoft/Phi-4-mini-instruct": (
        "Phi3Config",
        dict(
            vocab_size=200064,
            bos_token_id=199999,
            eos_token_id=199999,
            pad_token_id=199999,
            partial_rotary_factor=0.75,
            tie_word_embeddings=True,
        ),
    ),
}
_FORMAT = 1  # bump when the stand-ins' content changes: a stale root is rebuilt


def standin_paths(root) -> dict:
    root = Path(root)
    return {"hf_home": root / "hf_home", "corpus": root / "corpus", "tasks": root / "tasks"}


def activate(root) -> dict:
    """Point the Hugging Face libraries at the stand-ins (``HF_HOME``, offline) and return the variables set.

    huggingface_hub reads ``HF_HOME`` once, when it is first imported (importing `xtoken` imports it): in a
    process that has imported it with another ``HF_HOME`` this raises, rather than reading the wrong cache.
    In a notebook set ``os.environ["HF_HOME"]`` before ``import xtoken``; for a subprocess pass the returned
    variables as its environment."""
    import sys

    env = activate_env(root)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and os.path.realpath(hub.HF_HOME) != env["HF_HOME"]:
        raise RuntimeError(
            f"huggingface_hub was imported with HF_HOME={hub.HF_HOME}; set HF_HOME={env['HF_HOME']} "
            "(and HF_HUB_OFFLINE=1) before importing xtoken, transformers or datasets"
        )
    os.environ.update(env)
    return env


def _config(kind: str, fields: dict, hidden: int, layers: int):
    import transformers

    cls = getattr(transformers, kind)
    return cls(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        **fields,
    )


def _write_model(repo: str, hub: Path, hidden: int, layers: int, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .tokenizers import load_tokenizer

    kind, fields = STANDIN_MODELS[repo]
    cfg = _config(kind, fields, hidden, layers)
    torch.manual_seed(seed + int(hashlib.sha1(repo.encode()).hexdigest()[:6], 16))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    commit = hashlib.sha1(f"xtoken-standin-{_FORMAT}-{repo}-{hidden}-{layers}-{seed}".encode()).hexdigest()
    base = hub / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    model.save_pretrained(snap)
    load_tokenizer(repo, source="offline").save_pretrained(snap)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)


_WORDS = (
    "the model reads a long text about rivers mountains and the trade of salt between old towns "
    "every teacher splits words differently so the student must learn from chunks that span tokens "
    "Hundreds of numbers appear 2024 1999 37 512 and 1000000 in tables reports and recipes"
).split()
_EXTRA = [
    "Größe und Maß der Straße",
    "naïve café résumé",
    "def f(x):\n    return x * 2\n",
    "A+B=C; 3.14159",
    "    indented line\twith tab",
    "emoji 🙂 and CJK 漢字",
    "e.g. U.S. 10,000.50 $",
    "__init__ and snake_case",
]


def _corpus(rng: random.Random, n_docs: int) -> list[str]:
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(4, 12)):
            words = [
                rng.choice(_WORDS) if rng.random() < 0.8 else str(rng.randint(0, 99999))
                for _ in range(rng.randint(6, 18))
            ]
            parts.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ":", ";"]))
            if rng.random() < 0.25:
                parts.append(rng.choice(_EXTRA))
        docs.append(" ".join(parts))
    return docs


def _tasks(rng: random.Random, d: Path) -> None:
    def gsm(n):
        out = []
        for _ in range(n):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append(
                {
                    "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                    "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}",
                }
            )
        return out

    def arc(n):
        out = []
        for _ in range(n):
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            choices = sorted({a + b, a + b + 1, a * b, abs(a - b) + 2})
            out.append(
                {
                    "question": f"What is {a} plus {b}?",
                    "choices": [str(c) for c in choices],
                    "label": choices.index(a + b),
                }
            )
        return out

    d.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("standin_gsm8k_train", gsm(32)),
        ("standin_gsm8k_test", gsm(16)),
        ("standin_arc_train", arc(32)),
        ("standin_arc_test", arc(16)),
    ):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_standins(
    root, *, hidden: int = 32, layers: int = 2, seed: int = 0, n_docs: int = 64, shards: int = 4, force: bool = False
) -> dict:
    """Write the stand-ins under ``root`` (skipped when a finished build with the same settings is there).
    Returns `standin_paths(root)`."""
    root = Path(root)
    stamp = root / "standins.json"
    spec = {
        "format": _FORMAT,
        "hidden": hidden,
        "layers": layers,
        "seed": seed,
        "n_docs": n_docs,
        "shards": shards,
        "models": sorted(STANDIN_MODELS),
    }
    if stamp.exists() and not force and json.loads(stamp.read_text()) == spec:
        return standin_paths(root)
    if root.exists():
        shutil.rmtree(root)
    p = standin_paths(root)
    for repo in STANDIN_MODELS:
        _write_model(repo, p["hf_home"] / "hub", hidden, layers, seed)
    rng = random.Random(seed)
    docs = _corpus(rng, n_docs)
    p["corpus"].mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        (p["corpus"] / f"part-{k:04d}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in docs[k::shards])
        )
    _tasks(rng, p["tasks"])
    stamp.write_text(json.dumps(spec, indent=1))
    return p


# the grid the stand-in smoke runs: notebook 03's whole single-teacher grid, notebook 04's five pairs with static
# weights and the paper's best pair also with adaptive (CE) weights, the KD/CE sweep against one static weighting,
# notebook 06's first five on-policy settings (not its follow-up), one seed, 2 steps per run
SMOKE_PARAMETERS = {
    "weightings": ["static", "ce"],
    "adaptive_pairs": ["phi_hkl+llama_kl"],
    "seeds": [0],
    "kd_scalings": ["ce_heavy"],
    "run_followup": False,
}


def paper_smoke(root="runs/paper-smoke", *, nproc: int = 2, out=None, start: str = "03") -> int:
    """`make paper-smoke`: notebooks 03-06 at ``scale="paper"`` on the stand-ins (offline, CPU), then one
    run under ``torchrun --nproc_per_node nproc`` (gloo) on the streamed corpus. Returns an exit code."""
    import subprocess
    import sys

    root = Path(root).resolve()
    build_standins(root / "standins")
    out = Path(out or root / "notebooks").resolve()
    env = dict(os.environ, **{k: v for k, v in activate_env(root / "standins").items()})
    params = dict(SMOKE_PARAMETERS, standin_root=os.path.relpath(root / "standins", out))
    cmd = [
        sys.executable,
        "-m",
        "xtoken",
        "reproduce",
        "--scale",
        "paper",
        "--start",
        start,
        "--on-policy",
        "--out",
        str(out),
        "--results",
        str(root / "results"),
        "--work",
        str(root / "work"),
    ]
    for k, v in params.items():
        cmd += ["-p", f"{k}={json.dumps(v)}"]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc or nproc <= 1:
        return rc
    code = (
        "from xtoken import paper; "
        f"cfg = paper.grid_config({str(root / 'standins')!r}, nproc_per_node={nproc}); "
        f"df = paper.run_grid(cfg, ['hkl_phi'], work_dir={str(root / 'work-ddp')!r}); print(df.T)"
    )
    print(f"$ {nproc}-process run (torchrun, gloo) of hkl_phi on the streamed corpus", flush=True)
    rc = subprocess.run([sys.executable, "-c", code], env=env).returncode
    if rc == 0:
        rec = json.loads((root / "work-ddp" / "runs" / "hkl_phi" / "seed0" / "result.json").read_text())["record"]
        print(
            json.dumps(
                {
                    k: rec[k]
                    for k in (
                        "world_size",
                        "accumulation",
                        "global_batch",
                        "peak_memory_gb_per_rank",
                        "params_digest_per_rank",
                        "samples_collated_per_rank",
                        "texts_digest_per_rank",
                    )
                },
                indent=1,
            )
        )
        if len(set(rec["params_digest_per_rank"])) != 1 or len(set(rec["texts_digest_per_rank"])) != nproc:
            print("error: the ranks' weights differ or two ranks read the same samples", file=sys.stderr)
            return 1
    return rc


def activate_env(root) -> dict:
    """The environment variables of `activate`, without setting them (for a subprocess)."""
    p = standin_paths(root)
    return {
        "HF_HOME": str(Path(p["hf_home"]).resolve()),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


if __name__ == "__main__":
    import sys

    print(build_standins(sys.argv[1] if len(sys.argv) > 1 else "runs/paper-smoke/standins"))
