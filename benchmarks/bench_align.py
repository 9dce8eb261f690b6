"""Span alignment: xtoken.align vs TRL 1.16.0's GOLD byte-offset walk, same inputs, same run.

    python benchmarks/bench_align.py            (about a minute; one core)

Real Llama-3.2 (student) / Qwen3 (teacher) token sequences of 512 and 2,048 student tokens:
  prose     deterministic English-like text from a word list
  numeric   numbers, dates, prices, arithmetic
  bos       prose with Llama's BOS in front (student side only)
  nfd       prose with decomposed accents, which Qwen's NFC normalizer rewrites (Llama keeps them)

TRL's side is what its trainer runs on policy: byte offsets from `piece_byte_len` over
`convert_ids_to_tokens` (`GOLDTrainer._maybe_add_completion_byte_offsets`), then
`ULDLoss._align_by_byte_offsets`. Its time is reported with and without computing the offsets.
"""

from __future__ import annotations

import random
import time
import unicodedata

import torch

from xtoken import load_tokenizer
from xtoken.align import align, byte_table

WORDS = (
    "the of and to in is was for on that with as by at from his her it an be which or are this had not "
    "but what all were when we there can more if no man out other so time up about into than them "
    "could state only new year some take come these know see use get like then first any work now "
    "may such give over think most even find day also after way many must look before great back "
    "through long where much should well people down own just because good each those feel seem how "
    "high too place little world very still nation hand old life tell write become here show house"
).split()


def prose(rng: random.Random, n_words: int) -> str:
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if rng.random() < 0.08:
            out[-1] += rng.choice([".", ",", ";", "."])
    return " ".join(out) + "."


def numeric(rng: random.Random, n_items: int) -> str:
    parts = []
    for _ in range(n_items):
        a, b = rng.randint(0, 99999), rng.randint(0, 9999)
        parts.append(
            rng.choice(
                [
                    f"{a} + {b} = {a + b}.",
                    f"On {rng.randint(1, 28)}/{rng.randint(1, 12)}/"
                    f"{rng.randint(1900, 2099)} it cost ${a}.{b % 100:02d}",
                    f"{a} * 3 = {a * 3},",
                    f"x_{b} = {a / 7:.4f}\n",
                ]
            )
        )
    return " ".join(parts)


def nfd(rng: random.Random, n_words: int) -> str:
    text = prose(rng, n_words).split(" ")
    accented = [unicodedata.normalize("NFD", w) for w in ("café", "naïve", "résumé", "déjà", "über")]
    for i in range(5, len(text), 40):
        text[i] = rng.choice(accented)
    return " ".join(text)


def make_case(name: str, n_tokens: int, llama, qwen, rng):
    text = {
        "prose": lambda: prose(rng, n_tokens * 2),
        "bos": lambda: prose(rng, n_tokens * 2),
        "numeric": lambda: numeric(rng, n_tokens),
        "nfd": lambda: nfd(rng, n_tokens * 2),
    }[name]()
    s_ids = llama(text, add_special_tokens=False)["input_ids"][: n_tokens - (name == "bos")]
    text = llama.decode(s_ids)  # the text those student tokens cover
    if name == "nfd":
        text = unicodedata.normalize("NFD", text)
        s_ids = llama(text, add_special_tokens=False)["input_ids"]
    if name == "bos":
        s_ids = [llama.bos_token_id] + s_ids
    t_ids = qwen(text, add_special_tokens=False)["input_ids"]
    return s_ids, t_ids


def trl_offsets(tok, ids, piece_byte_len):
    """TRL's on-policy byte offsets: cumulative piece_byte_len of each token's string."""
    offs, cum = [], 0
    for piece in tok.convert_ids_to_tokens(ids):
        nb = piece_byte_len(piece)
        offs.append((cum, cum + nb))
        cum += nb
    return offs


def timeit(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def main():
    torch.set_num_threads(1)
    from trl.experimental.gold.gold_trainer import ULDLoss
    from trl.experimental.utils import piece_byte_len

    trl_align = ULDLoss._align_by_byte_offsets
    llama, qwen = load_tokenizer("llama"), load_tokenizer("qwen3")
    byte_table(llama), byte_table(qwen)  # built once per tokenizer (cached)
    rng = random.Random(0)
    print(
        f"{'case':8} {'n_S':>5} {'n_T':>5} | {'groups ours':>11} {'TRL':>5} | {'largest ours':>12} {'TRL':>5} | "
        f"{'unpaired S/T':>12} | {'ours ms':>8} {'tok/s':>9} | {'TRL ms':>7} {'(walk only)':>11} | {'speedup':>7}"
    )
    for n in (512, 2048):
        for name in ("prose", "numeric", "bos", "nfd"):
            s_ids, t_ids = make_case(name, n, llama, qwen, rng)
            a = align(s_ids, t_ids, llama, qwen)
            s_off, t_off = trl_offsets(llama, s_ids, piece_byte_len), trl_offsets(qwen, t_ids, piece_byte_len)
            sg, tg = trl_align(s_off, t_off)
            repeat = 200 if n == 512 else 50
            t_ours = timeit(lambda: align(s_ids, t_ids, llama, qwen), repeat)
            t_walk = timeit(lambda: trl_align(s_off, t_off), repeat)
            t_trl = timeit(
                lambda: trl_align(trl_offsets(llama, s_ids, piece_byte_len), trl_offsets(qwen, t_ids, piece_byte_len)),
                max(repeat // 5, 5),
            )
            largest = int((a.student_spans[:, 1] - a.student_spans[:, 0]).max())
            print(
                f"{name:8} {len(s_ids):5} {len(t_ids):5} | {len(a):11} {len(sg):5} | {largest:12} "
                f"{max(map(len, sg)):5} | {len(a.student_unpaired):5}/{len(a.teacher_unpaired):<6} | "
                f"{t_ours * 1e3:8.3f} {len(s_ids) / t_ours / 1e6:8.2f}M | {t_trl * 1e3:7.3f} {t_walk * 1e3:11.3f} | "
                f"{t_trl / t_ours:6.1f}x"
            )
    print(
        "tok/s: student tokens per second, ours (ids in, alignment out, one core). "
        "speedup: TRL (offsets + walk) / ours."
    )


if __name__ == "__main__":
    main()
