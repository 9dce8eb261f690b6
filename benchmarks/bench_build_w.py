"""Benchmark: building W vs just encoding every student token string with the teacher.

Issue target: build_projection at most 3x the time of the bare encode, and under 1.5 GB peak RSS.
Each measurement runs in a fresh subprocess so peak RSS is its own. Run:

    python benchmarks/bench_build_w.py
"""

import json
import subprocess
import sys

PAIRS = [("meta-llama/Llama-3.2-1B", "Qwen/Qwen3-4B"), ("meta-llama/Llama-3.2-1B", "microsoft/Phi-4-mini-instruct")]

CHILD = r"""
import json, resource, sys, time
from xtoken import load_tokenizer
from xtoken.canonical import token_bytes
from xtoken.projection import build_projection
student, teacher, what = sys.argv[1:4]
s, t = load_tokenizer(student), load_tokenizer(teacher)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if what == "encode":   # the floor: decode every student token and encode it with the teacher
    texts = [b.decode("utf-8", "replace") for b in token_bytes(s) if b is not None]
    t.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
else:
    build_projection(s, t)
sec = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": sec, "peak_rss_mb": peak / 1024, "tokenizers_rss_mb": base / 1024}))
"""


def run(student, teacher, what, threads):
    env = {"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true", "PATH": "/usr/bin:/bin"}
    import os

    env = dict(os.environ, **env)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, student, teacher, what], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    threads = 2
    print(f"{'pair':45s} {'encode s':>9s} {'build s':>8s} {'ratio':>6s} {'build peak RSS':>15s}")
    for student, teacher in PAIRS:
        enc = min((run(student, teacher, "encode", threads) for _ in range(2)), key=lambda r: r["seconds"])
        build = min((run(student, teacher, "build", threads) for _ in range(2)), key=lambda r: r["seconds"])
        ratio = build["seconds"] / enc["seconds"]
        print(
            f"{student.split('/')[1] + ' -> ' + teacher.split('/')[1]:45s} "
            f"{enc['seconds']:9.2f} {build['seconds']:8.2f} "
            f"{ratio:6.2f}x {build['peak_rss_mb']:10.0f} MB  (target <= 3x, < 1536 MB; tokenizers alone "
            f"{build['tokenizers_rss_mb']:.0f} MB)"
        )
    print(
        "The official implementation materializes a dense bf16 |V_S| x |V_T| matrix: "
        f"{128256 * 151936 * 2 / 1e9:.0f} GB for Llama x Qwen3."
    )


if __name__ == "__main__":
    main()
