"""A seeded synthetic corpus for the miniature, as Arrow-backed `datasets.Dataset` splits.

Two skills, every item a `text` (what training reads) plus, for test items, a `question` (the
prompt lm-eval gives) and an `answer` (the string after ``#### ``):

``arithmetic`` -- GSM8k-like word problems with worked steps and a final ``#### N`` line. Llama-3 (and
  o200k) write a number of up to 3 digits as ONE token ("347"); Qwen3 writes it digit by digit ("3","4","7").
  The kinds are ones a tiny Llama-tokenized student can learn while it still has to *produce* multi-digit
  numeral tokens, and where a teacher that knows more can pass it on:
    copy       a number stated in the question is the answer ("puts all 347 shells in a box")
    compare    which of two numbers is larger / smaller
    add        a + b with one-digit a, b ("7 + 5 = 12."): 64 facts a tiny student can learn, more than half of
               them with a two-digit answer, one Llama token, which Qwen3 writes as a carry digit and a units
               digit; through W the teacher's distribution reaches the student's numeral token through its first
               digit, the carry
    count      N, then +1 / -1 a few times, every step written out (counting steps)
  Exercises: producing multi-digit numeral tokens at numeral positions (GOLD suppresses them,
  Proposition 1), column addition with carries, ordering.

Over-conservative matching (the paper's second failure of GOLD, 'Hundreds' vs 'Hund' + 'reds'): a few words
  of the corpus are one token for the Llama student and two for Phi's o200k ("cigars", "adventurer",
  "biologist"), and the reverse ("walnuts", "carpenter", "fisherman"). GOLD's strict common set leaves the
  first kind out (their mass is suppressed like a numeral's under Qwen3); H-KL's widened set pairs them with
  W's top teacher token. Their share of the corpus's token occurrences is set near the share measured on real
  English text (docs/miniature.md).

``knowledge`` -- facts about a fixed invented world: countries with a capital, a population (in
  thousands, a numeral) and a language; people with an age (numeral), a profession and a home
  country. The training split states every fact in biography / gazetteer paragraphs (several
  paraphrases, shuffled order) and holds question-answer items for a share
  ``know_qa_train_frac`` of the facts; the test split asks the other facts in the same QA form,
  so a model must retrieve a fact it has only read stated. Exercises: memorisation and retrieval
  of names and numerals; teachers trained mostly on one skill (``teacher_mix``) differ here,
  which is what the complementarity experiment (notebook 04) needs.

Deterministic given the seed (Python's `random.Random(seed)` only). `build_corpus` verifies that
every text tokenizes, under every tokenizer given, into the kept ids of its restricted vocabulary
(`xtoken.mini.models.keep_ids_for`) and raises `CorpusOutOfVocab` if not.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = [
    "make_corpus",
    "save_corpus",
    "load_corpus",
    "write_task_files",
    "CorpusOutOfVocab",
    "SKILLS",
    "ANSWER_MARK",
    "RESERVED_ARITH",
    "arithmetic_test_items",
]

SKILLS = ("arithmetic", "knowledge")
ANSWER_MARK = "#### "
END = "\n\n"  # end of every text (and the generation stop sequence)


class CorpusOutOfVocab(ValueError):
    """A corpus text tokenizes into an id outside a restricted vocabulary."""


_NAMES = [
    "Mia",
    "Leo",
    "Ava",
    "Sam",
    "Zoe",
    "Max",
    "Ivy",
    "Ben",
    "Eva",
    "Tom",
    "Amy",
    "Jay",
    "Kim",
    "Ray",
    "Lia",
    "Dan",
]
_THINGS = [
    "apples",
    "shells",
    "coins",
    "books",
    "cigars",
    "walnuts",
    "cards",
    "beads",
    "pens",
    "eggs",
    "bricks",
    "seeds",
]
_PLACES = {
    "apples": "basket",
    "shells": "box",
    "coins": "jar",
    "books": "shelf",
    "cigars": "case",
    "walnuts": "sack",
    "cards": "deck",
    "beads": "tin",
    "pens": "cup",
    "eggs": "crate",
    "bricks": "pile",
    "seeds": "pot",
}
_SYL = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "tor",
    "sel",
    "dun",
    "bri",
    "zo",
    "qua",
    "mar",
    "fen",
    "li",
    "gor",
    "tha",
    "nu",
    "pel",
    "vas",
    "dre",
    "ol",
    "ix",
    "sha",
    "rin",
]
# four of ten professions are tokenized differently by Llama and o200k: "adventurer" and "biologist" are one
# Llama token and two o200k tokens, "carpenter" and "fisherman" the reverse
_PROFESSIONS = [
    "baker",
    "pilot",
    "farmer",
    "doctor",
    "adventurer",
    "biologist",
    "carpenter",
    "fisherman",
    "singer",
    "judge",
]
_LANGUAGES = ["Vessic", "Orlan", "Tamik", "Brelish", "Quorin", "Ulmic"]

ARITH_KINDS = ("copy", "compare", "add", "count")
ARITH_WEIGHTS = (0.2, 0.2, 0.4, 0.2)


def _num(rng: random.Random) -> int:
    """0..999 with every digit count represented (1-digit 10%, 2-digit 30%, 3-digit 60%)."""
    r = rng.random()
    if r < 0.1:
        return rng.randint(0, 9)
    if r < 0.4:
        return rng.randint(10, 99)
    return rng.randint(100, 999)


def arithmetic_item(rng: random.Random) -> dict:
    kind = rng.choices(ARITH_KINDS, ARITH_WEIGHTS)[0]
    who, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    place = _PLACES[thing]
    if kind == "copy":
        n = _num(rng)
        q = f"{who} has {n} {thing}. {who} puts all of them in a {place}. How many {thing} are in the {place}?"
        steps = [f"The {place} holds {n} {thing}."]
        ans = n
    elif kind == "compare":
        other = rng.choice([x for x in _NAMES if x != who])
        a, b = _num(rng), _num(rng)
        while b == a:
            b = _num(rng)
        more = rng.random() < 0.5
        q = (
            f"{who} has {a} {thing} and {other} has {b} {thing}. "
            f"How many {thing} does the one with {'more' if more else 'fewer'} {thing} have?"
        )
        hi, lo = max(a, b), min(a, b)
        steps = [f"{hi} is more than {lo}."]
        ans = hi if more else lo
    elif kind == "add":  # a one-digit sum: a two-digit answer is a carry ("7 + 5 = 12": Qwen3 writes "1", "2")
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{who} has {a} {thing}. {who} gets {b} more. How many {thing} does {who} have now?"
        steps = [f"{a} + {b} = {a + b}."]
        ans = a + b
    else:  # count: a few +1 / -1 steps, each written out
        n = rng.randint(5, 994)
        moves = [rng.choice((1, -1)) for _ in range(rng.randint(2, 4))]
        words = ", then ".join("finds 1 more" if m > 0 else "loses 1" for m in moves)
        q = f"{who} has {n} {thing}. {who} {words}. How many {thing} does {who} have now?"
        steps, cur = [], n
        for m in moves:
            steps.append(f"{cur} {'+' if m > 0 else '-'} 1 = {cur + m}.")
            cur += m
        ans = cur
    assert 0 <= ans <= 999
    return {
        "skill": "arithmetic",
        "kind": kind,
        "question": q,
        "text": q + "\n" + "\n".join(steps) + f"\n{ANSWER_MARK}{ans}",
        "answer": str(ans),
    }


def make_world(seed: int, n_countries: int, n_people: int) -> dict:
    """The invented world: deterministic given (seed, sizes)."""
    rng = random.Random(f"world-{seed}")

    def word(n_syl, used):
        while True:
            w = "".join(rng.choice(_SYL) for _ in range(n_syl)).capitalize()
            if w not in used:
                used.add(w)
                return w

    used: set = set()
    countries = []
    for _ in range(n_countries):
        countries.append(
            {
                "name": word(2, used),
                "capital": word(2, used),
                "population": rng.randint(10, 999),
                "language": rng.choice(_LANGUAGES),
            }
        )
    people = []
    for _ in range(n_people):
        people.append(
            {
                "name": f"{word(2, used)} {word(2, used)}",
                "age": rng.randint(18, 99),
                "profession": rng.choice(_PROFESSIONS),
                "country": rng.choice(countries)["name"],
            }
        )
    return {"countries": countries, "people": people}


_Q = {  # attribute -> (question template, answer key)
    "capital": "What is the capital of {name}?",
    "population": "How many thousand people live in {name}?",
    "language": "What language is spoken in {name}?",
    "age": "How old is {name}?",
    "profession": "What is the job of {name}?",
    "country": "In which country does {name} live?",
}
_STATE = {
    "capital": ["The capital of {name} is {v}.", "{v} is the capital of {name}.", "{name} has its capital at {v}."],
    "population": [
        "{name} has {v} thousand people.",
        "About {v} thousand people live in {name}.",
        "The population of {name} is {v} thousand.",
    ],
    "language": ["People in {name} speak {v}.", "The language of {name} is {v}.", "{v} is spoken in {name}."],
    "age": ["{name} is {v} years old.", "The age of {name} is {v}.", "{name} turned {v} this year."],
    "profession": ["{name} works as a {v}.", "{name} is a {v} by trade.", "The job of {name} is {v}."],
    "country": ["{name} lives in {v}.", "{name} has a home in {v}.", "The home of {name} is in {v}."],
}
_ATTRS = {"country": ("capital", "population", "language"), "person": ("age", "profession", "country")}


def world_facts(world: dict) -> list[tuple[str, str, str]]:
    facts = []
    for c in world["countries"]:
        facts += [(c["name"], a, str(c[a])) for a in _ATTRS["country"]]
    for p in world["people"]:
        facts += [(p["name"], a, str(p[a])) for a in _ATTRS["person"]]
    return facts


def _qa(name, attr, value) -> dict:
    q = _Q[attr].format(name=name)
    return {"skill": "knowledge", "kind": attr, "question": q, "text": f"{q}\n{ANSWER_MARK}{value}", "answer": value}


def knowledge_items(rng: random.Random, world: dict, n_train: int, n_test: int, qa_train_frac: float):
    facts = world_facts(world)
    order = list(range(len(facts)))
    rng.shuffle(order)
    n_qa_train = int(round(qa_train_frac * len(facts)))
    qa_train = [facts[i] for i in order[:n_qa_train]]
    qa_test = [facts[i] for i in order[n_qa_train:]] or [facts[i] for i in order]
    by_entity: dict = {}
    for name, attr, value in facts:
        by_entity.setdefault(name, []).append((attr, value))
    entities = sorted(by_entity)
    train = []
    n_docs = n_train - len(qa_train) if n_train > len(qa_train) else n_train // 2
    for i in range(n_docs):  # paragraphs stating every fact of an entity, paraphrased and shuffled
        name = entities[i % len(entities)]
        sents = [rng.choice(_STATE[a]).format(name=name, v=v) for a, v in by_entity[name]]
        rng.shuffle(sents)
        train.append({"skill": "knowledge", "kind": "statement", "question": "", "text": " ".join(sents), "answer": ""})
    for f in qa_train:
        train.append(_qa(*f))
    train = train[:n_train] if n_train >= len(qa_train) else train
    test = [_qa(*qa_test[i % len(qa_test)]) for i in range(min(n_test, len(qa_test)))]
    return train, test


# The first RESERVED_ARITH unique arithmetic items of the corpus stream are held out of training whatever the
# test size: training items are drawn after them from the same stream, so this count (not a config field) fixes
# the training split. They are the first rows of the arithmetic test set (the whole test set at n = 200).
RESERVED_ARITH = 200


def arithmetic_test_items(seed: int, n: int, reserved: list, train_questions: set) -> list:
    """The arithmetic test set: the first ``min(n, len(reserved))`` reserved items, then items of the
    test stream ``Random("test-arithmetic-<seed>")`` whose question is neither in training nor already in
    the test set. Depends on the training split, never the other way round."""
    out = list(reserved[:n])
    seen = {it["question"] for it in out}
    rng = random.Random(f"test-arithmetic-{seed}")
    while len(out) < n:
        it = arithmetic_item(rng)
        if it["question"] not in seen and it["question"] not in train_questions:
            seen.add(it["question"])
            out.append(it)
    return out


def make_corpus(cfg, tokenizers: dict | None = None, keep: dict | None = None):
    """Build the corpus as a `datasets.DatasetDict` with splits ``train`` and ``test``.

    Columns: idx (int, stable row id), skill, kind, question, text, answer.
    ``tokenizers`` {name: tokenizer} with ``keep`` {name: set of kept ids}: every text is checked.
    The training split depends on ``seed``, ``n_train_*``, the world's sizes and ``know_qa_train_frac`` only:
    the test sizes (``n_test_arith``, ``n_test_know``) never change it. Test rows: the arithmetic items
    (the first `RESERVED_ARITH` of them are the items drawn first from the corpus stream), then the
    knowledge items.
    """
    from datasets import Dataset, DatasetDict

    rng = random.Random(f"corpus-{cfg.seed}")
    reserved_q: set = set()
    reserved = []
    while len(reserved) < RESERVED_ARITH:
        it = arithmetic_item(rng)
        if it["question"] not in reserved_q:
            reserved_q.add(it["question"])
            reserved.append(it)
    arith_train = []
    while len(arith_train) < cfg.n_train_arith:
        it = arithmetic_item(rng)
        if it["question"] not in reserved_q:  # no reserved (test) question seen in training
            arith_train.append(it)
    world = make_world(cfg.seed, cfg.n_countries, cfg.n_people)
    know_train, know_test = knowledge_items(rng, world, cfg.n_train_know, cfg.n_test_know, cfg.know_qa_train_frac)
    train = arith_train + know_train
    rng.shuffle(train)
    arith_test = arithmetic_test_items(cfg.seed, cfg.n_test_arith, reserved, {it["question"] for it in arith_train})
    test = arith_test + know_test
    for r in train + test:  # every document ends with a blank line: lm-eval's stop sequence
        r["text"] = r["text"] + END
    for i, r in enumerate(train):
        r["idx"] = i
    for i, r in enumerate(test):
        r["idx"] = i
    cols = ["idx", "skill", "kind", "question", "text", "answer"]
    dd = DatasetDict(
        {
            "train": Dataset.from_dict({c: [r[c] for r in train] for c in cols}),
            "test": Dataset.from_dict({c: [r[c] for r in test] for c in cols}),
        }
    )
    if tokenizers:
        check_vocab(dd, tokenizers, keep)
    return dd


def all_texts(dd) -> list[str]:
    out = []
    for split in dd.values():
        out += list(split["text"]) + [q + "\n" for q in split["question"] if q]  # prompts as lm-eval sends them
    return out


def check_vocab(dd, tokenizers: dict, keep: dict) -> None:
    texts = all_texts(dd)
    for name, tok in tokenizers.items():
        kept = keep[name]
        for ids, text in zip(tok(texts, add_special_tokens=False)["input_ids"], texts):
            bad = [i for i in ids if i not in kept]
            if bad:
                raise CorpusOutOfVocab(
                    f"{name}: {text!r} uses ids {bad[:5]} ({tok.convert_ids_to_tokens(bad[:5])}) "
                    f"outside its restricted vocabulary"
                )


def save_corpus(dd, out_dir) -> Path:
    out = Path(out_dir) / "corpus"
    dd.save_to_disk(str(out))
    return out


def load_corpus(out_dir):
    from datasets import load_from_disk

    p = Path(out_dir)
    return load_from_disk(str(p / "corpus" if (p / "corpus").exists() else p))


def write_task_files(dd, out_dir) -> dict:
    """One JSONL per skill of the test split (lm-eval's local data files). Returns {skill: path}."""
    out = Path(out_dir) / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    test = dd["test"]
    for skill in SKILLS:
        p = out / f"{skill}_test.jsonl"
        with p.open("w") as f:
            for r in test:
                if r["skill"] == skill:
                    f.write(
                        json.dumps(
                            {
                                "idx": r["idx"],
                                "kind": r["kind"],
                                "question": r["question"],
                                "answer": r["answer"],
                                "text": r["text"],
                            }
                        )
                        + "\n"
                    )
        paths[skill] = str(p)
    return paths
