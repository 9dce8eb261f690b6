"""The miniature: corpus determinism and Arrow round trip, restricted tokenizers, vocabulary check,
and the smoke preset end to end (teacher training through XTokenTrainer + lm-eval)."""

import hashlib
import json
import random
import re

import pyarrow as pa
import pytest
import torch

from xtoken.mini.config import MiniConfig
from xtoken.mini.corpus import CorpusOutOfVocab, check_vocab, load_corpus, make_corpus, save_corpus
from xtoken.mini.models import keep_ids_for, numeral_strings, restrict_tokenizer


def _table_hash(ds) -> str:
    sink = pa.BufferOutputStream()
    table = ds.data.table
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


@pytest.fixture(scope="module")
def smoke_corpus():
    return make_corpus(MiniConfig.preset("smoke"))


def test_corpus_deterministic(smoke_corpus):
    again = make_corpus(MiniConfig.preset("smoke"))
    other = make_corpus(MiniConfig.preset("smoke", seed=1))
    for split in ("train", "test"):
        assert _table_hash(smoke_corpus[split]) == _table_hash(again[split])
        assert _table_hash(smoke_corpus[split]) != _table_hash(other[split])


def test_corpus_shape(smoke_corpus):
    cfg = MiniConfig.preset("smoke")
    train, test = smoke_corpus["train"], smoke_corpus["test"]
    assert list(train["idx"]) == list(range(len(train)))
    assert set(train["skill"]) == {"arithmetic", "knowledge"}
    for skill in ("arithmetic", "knowledge"):
        rows = [r for r in test if r["skill"] == skill]
        assert 0 < len(rows) <= {"arithmetic": cfg.n_test_arith, "knowledge": cfg.n_test_know}[skill]
        for r in rows:  # the answer is the one after '#### ', and the prompt is the text's prefix
            assert r["text"].startswith(r["question"] + "\n")
            assert r["text"].rstrip("\n").endswith("#### " + r["answer"])
    # no arithmetic test question appears in training
    train_q = {q for q, s in zip(train["question"], train["skill"]) if s == "arithmetic"}
    assert not train_q & {q for q, s in zip(test["question"], test["skill"]) if s == "arithmetic"}
    # arithmetic answers are worked out correctly: the last '= N.' step (or the copied number) is N
    for r in train:
        if r["skill"] == "arithmetic" and r["kind"] == "count":
            last = [ln for ln in r["text"].splitlines() if "=" in ln][-1]
            a, op, b, _, c = last.rstrip(".").split()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c) == int(r["answer"])
        if r["skill"] == "arithmetic" and r["kind"] == "add":  # one-digit operands, the sum as the one step
            a, b = (int(x) for x in re.search(r"has (\d+) \w+\. \w+ gets (\d+) more", r["question"]).groups())
            assert 2 <= a <= 9 and 2 <= b <= 9
            assert r["text"].splitlines()[1] == f"{a} + {b} = {a + b}." and int(r["answer"]) == a + b


def test_arrow_round_trip(smoke_corpus, tmp_path):
    save_corpus(smoke_corpus, tmp_path)
    back = load_corpus(tmp_path)
    for split in ("train", "test"):
        assert back[split].to_dict() == smoke_corpus[split].to_dict()
        assert _table_hash(back[split]) == _table_hash(smoke_corpus[split])


@pytest.mark.parametrize("name", ["llama", "qwen", "phi"])
def test_restricted_tokenizer_round_trip(name, request, smoke_corpus):
    tok = request.getfixturevalue(name)
    texts = list(smoke_corpus["train"]["text"])
    keep = keep_ids_for(texts, tok)
    local, l2f = restrict_tokenizer(tok, keep)
    assert l2f.tolist() == keep and len(local) == len(tok)
    probe = texts[:50] + numeral_strings()[::37] + ["Hello, world! 2024 and 99.5\n\n", "日本語 tab\tend"]
    for x in probe:
        full = tok(x).input_ids
        loc = local(x).input_ids
        assert len(loc) == len(full)
        if all(i in set(keep) for i in full):
            assert l2f[torch.tensor(loc)].tolist() == full
            assert max(loc) < len(keep)
        assert local.decode(loc) == tok.decode(full)
    assert local.eos_token == tok.eos_token and local.bos_token == tok.bos_token
    assert local.eos_token_id == keep.index(tok.eos_token_id)


def test_restricted_tokenizer_shuffled_keep(llama):
    keep = random.Random(0).sample(range(1000), 50) + [llama.bos_token_id, llama.eos_token_id]
    local, l2f = restrict_tokenizer(llama, keep)
    assert local.convert_ids_to_tokens(list(range(52))) == llama.convert_ids_to_tokens(keep)
    with pytest.raises(ValueError):
        restrict_tokenizer(llama, [1, 1])


def test_corpus_within_kept_ids(smoke_corpus, llama, qwen, phi):
    toks = {"llama": llama, "qwen3": qwen, "phi": phi}
    train_texts = list(smoke_corpus["train"]["text"])
    keep = {k: set(keep_ids_for(train_texts, t)) for k, t in toks.items()}
    check_vocab(smoke_corpus, toks, keep)  # test split included: raises if a test word is unseen
    bad = make_corpus(MiniConfig.preset("smoke"))
    bad["train"] = bad["train"].add_item(
        {"idx": -1, "skill": "knowledge", "kind": "x", "question": "", "text": "Zyzzyva quokka", "answer": ""}
    )
    with pytest.raises(CorpusOutOfVocab):
        check_vocab(bad, toks, keep)


def test_smoke_teacher_trains_and_evaluates(tmp_path):
    from transformers import AutoModelForCausalLM

    from xtoken.mini import experiment as E

    cfg = MiniConfig.preset("smoke")
    info = E.build_corpus(cfg, tmp_path)
    assert info["vocab_sizes"]["qwen3"] < info["vocab_sizes"]["llama"]
    df = E.train_teachers(cfg, tmp_path, names=["qwen3"], workers=1)
    row = df.iloc[0]
    assert row["teacher"] == "qwen3" and row["vocab"] == info["vocab_sizes"]["qwen3"]
    for skill in ("arithmetic", "knowledge"):
        assert 0.0 <= row[skill] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "teachers" / "qwen3"))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.get_output_embeddings().weight.shape[0] == info["vocab_sizes"]["qwen3"]


@pytest.mark.slow
def test_smoke_grid_end_to_end(tmp_path):
    """Every stage of the smoke preset: `prepare` (corpus, then teachers, base student, caches and an
    early GOLD run in one 2-worker pool where a cache waits for its teacher and a run for the base
    student and its teacher's cache), then a CE run and a two-teacher run, each writing result.json;
    second calls read everything back."""
    from xtoken.mini import experiment as E

    cfg = MiniConfig.preset("smoke", workers=2)
    settings = [
        E.SINGLE_TEACHER_SETTINGS[0],
        E.Setting("gold_qwen3", [("qwen3", "gold", 1.0)]),
        E.Setting("two", [("phi", "h_kl", 0.5), ("llama", "kl", 0.5)]),
        E.Setting("kd_llama@dynamic", [("llama", "kl", 1.0)], kd_scaling="dynamic"),
        E.on_policy_settings()[2],  # on-policy P-KL (Qwen3) on the arithmetic rows, every batch on-policy
    ]
    prep = E.prepare(cfg, tmp_path, runs=settings[1:2])
    assert list(prep["teachers"]["teacher"]) == list(E.TEACHERS) and "models_s" in prep["timings"]
    assert 0.0 <= prep["base"]["numeral_mass"] <= 1.0
    assert all((tmp_path / "cache" / f"{n}.npy").exists() for n in E.TEACHERS)
    assert (tmp_path / "teachers" / "qwen3" / "train.log").read_text(), "console output goes to the job's log"
    early = tmp_path / "runs" / "gold_qwen3" / "seed0" / "result.json"
    assert early.exists() and early.stat().st_mtime >= (tmp_path / "cache" / "qwen3.npy").stat().st_mtime
    assert E.prepare(cfg, tmp_path, runs=settings[1:2])["timings"] == {}, "a second prepare reuses everything"
    cfg.workers = 1
    df = E.run_grid(cfg, settings, [0], tmp_path, workers=1)
    assert list(df["setting"]) == ["ce_only", "gold_qwen3", "two", "kd_llama@dynamic", "pkl_qwen3@on_policy"]
    assert df[["arithmetic", "knowledge", "numeral_mass"]].notna().all().all()
    assert "final_kd_qwen3" in df.columns and "final_kd_phi" in df.columns
    res = json.loads((tmp_path / "runs" / "two" / "seed0" / "result.json").read_text())
    assert res["setting_spec"]["teachers"] == [["phi", "h_kl", 0.5], ["llama", "kl", 0.5]]
    assert len(res["numeral_mass_history"]) >= 2
    # the dynamic KD/CE scaling reached the trainer (it logs the CE / KD ratio it applies), the default did not
    logged = lambda name: {
        k
        for r in json.loads((tmp_path / "runs" / name / "seed0" / "result.json").read_text())["log_history"]
        for k in r
    }  # noqa: E731
    assert "kd_scale" in logged("kd_llama@dynamic") and "kd_scale" not in logged("two")
    # the on-policy run generated (every logged step on-policy) and trained on the arithmetic rows only
    on = json.loads((tmp_path / "runs" / "pkl_qwen3@on_policy" / "seed0" / "result.json").read_text())
    steps = [r for r in on["log_history"] if "on_policy" in r]
    assert steps and all(r["on_policy"] == 1.0 and r["gen_tokens"] > 0 for r in steps)
    assert "on_policy" not in logged("two")
    again = E.run_grid(cfg, settings, [0], tmp_path, workers=1)  # read back, nothing retrained
    assert again["arithmetic"].tolist() == df["arithmetic"].tolist()
    table = E.results_table(df)
    assert list(table.index) == ["ce_only", "gold_qwen3", "two", "kd_llama@dynamic", "pkl_qwen3@on_policy"]


def test_kd_scaling_settings():
    """The KD/CE sweep: dynamic and three static weightings per base setting; the weighting equal to the config's
    own is the base row (not run twice); every comparison is dynamic vs a static weighting; a bad name is refused."""
    from xtoken.mini.settings import KD_SCALINGS, Setting, kd_scaling_settings

    cfg = MiniConfig.preset("mini")  # default weighting: CE + 1.0 KD, static = "balanced"
    settings, comparisons = kd_scaling_settings(cfg)
    assert [s.name for s in settings] == [
        f"{b}@{k}" for b in ("pkl_qwen3", "kd_llama") for k in ("dynamic", "kd_heavy", "ce_heavy")
    ]
    assert [s.loss_weights(cfg) for s in settings[:3]] == [(1.0, 1.0, True), (1.0, 4.0, False), (1.0, 0.25, False)]
    assert [(a, b) for _, a, b, _, _ in comparisons[:3]] == [
        ("pkl_qwen3@dynamic", "pkl_qwen3@kd_heavy"),
        ("pkl_qwen3@dynamic", "pkl_qwen3"),
        ("pkl_qwen3@dynamic", "pkl_qwen3@ce_heavy"),
    ]
    assert all(p == "> 0" for _, _, _, p, _ in comparisons) and len(comparisons) == 6
    # a config whose own weighting is dynamic: the dynamic row is the base, "balanced" is run
    dyn = MiniConfig.preset("mini", dynamic_kd_scale=True)
    names = [s.name for s in kd_scaling_settings(dyn)[0]]
    assert "pkl_qwen3@dynamic" not in names and "pkl_qwen3@balanced" in names
    assert Setting("x").loss_weights(dyn) == (1.0, 1.0, True) and KD_SCALINGS["default"] is None
    assert Setting.from_dict(settings[1].to_dict()).kd_scaling == "kd_heavy"
    with pytest.raises(ValueError, match="kd_scaling"):
        Setting("x", kd_scaling="heavy")


def test_on_policy_settings():
    """The on-policy experiment: two off-policy references and three on-policy losses, all on the arithmetic rows;
    the fields survive a round trip and bad values are refused."""
    from xtoken.mini.settings import Setting, on_policy_settings

    s = on_policy_settings()
    assert [x.name for x in s] == [
        "ce_only@arith",
        "pkl_qwen3@arith",
        "pkl_qwen3@on_policy",
        "gold_qwen3@on_policy",
        "hkl_qwen3@on_policy",
    ]
    assert [x.lmbda for x in s] == [0.0, 0.0, 1.0, 1.0, 1.0] and {x.data for x in s} == {"arithmetic_prompts"}
    assert s[0].teachers == [] and [x.teachers[0][1] for x in s[1:]] == ["p_kl", "p_kl", "gold", "h_kl"]
    back = Setting.from_dict(s[3].to_dict())
    assert (back.lmbda, back.data, back.teachers) == (1.0, "arithmetic_prompts", [("qwen3", "gold", 1.0)])
    assert s[2].relative_cost() > s[1].relative_cost()
    with pytest.raises(ValueError, match="lmbda"):
        Setting("x", lmbda=1.5)
    with pytest.raises(ValueError, match="data"):
        Setting("x", data="chat")
    # the first on-policy settings trained CE on the student's own samples too, as they ran
    assert [x.on_policy_ce for x in s] == [False, False, True, True, True]
    assert Setting.from_dict(s[2].to_dict()).on_policy_ce is True


def test_on_policy_followup_settings():
    """The follow-up: CE on own samples alone, P-KL on-policy with KD alone and mixed (lmbda 0.5), Llama KL
    off- and on-policy; every comparison (first experiment and follow-up) names settings of the two lists; the
    on_policy_ce flag round-trips (an old dict without it reads False); no setting would be refused by the trainer
    (on-policy with neither a teacher nor CE)."""
    from xtoken.mini.experiment import (
        KD_SCALINGS,
        Setting,
        on_policy_comparisons,
        on_policy_followup_comparisons,
        on_policy_followup_settings,
        on_policy_settings,
    )

    f = on_policy_followup_settings()
    assert [x.name for x in f] == [
        "ce_only@on_policy",
        "pkl_qwen3@on_policy_no_ce",
        "pkl_qwen3@mixed",
        "kd_llama@arith",
        "kd_llama@on_policy_no_ce",
    ]
    assert [x.lmbda for x in f] == [1.0, 1.0, 0.5, 0.0, 1.0]
    assert [x.on_policy_ce for x in f] == [True, False, False, False, False]
    assert {x.data for x in f} == {"arithmetic_prompts"}
    assert [x.teachers for x in f] == [
        [],
        [("qwen3", "p_kl", 1.0)],
        [("qwen3", "p_kl", 1.0)],
        [("llama", "kl", 1.0)],
        [("llama", "kl", 1.0)],
    ]
    first = on_policy_settings()
    names = [x.name for x in first + f]
    assert len(set(names)) == len(names), "no follow-up setting reuses a name of the first experiment"
    for comparisons in (on_policy_comparisons(), on_policy_followup_comparisons()):
        assert comparisons
        for name, a, b, claim, _ in comparisons:
            assert a in names and b in names and a != b, name
            assert claim is None
    assert len(on_policy_followup_comparisons()) == 5
    for x in first + f:
        back = Setting.from_dict(x.to_dict())
        assert back == Setting(**{**vars(x), "label": x.label or x.name})
        assert back.on_policy_ce is x.on_policy_ce
        assert not (x.lmbda > 0 and not x.teachers and not x.on_policy_ce), f"{x.name}: no loss on-policy"
    old = f[0].to_dict()
    del old["on_policy_ce"]
    assert Setting.from_dict(old).on_policy_ce is False, "a dict without the flag reads the default"
    assert Setting("x").on_policy_ce is False
    assert KD_SCALINGS["kd_only"] == (0.0, 1.0, False)
    assert Setting("x", kd_scaling="kd_only").loss_weights(MiniConfig.preset("mini")) == (0.0, 1.0, False)


def test_pool_dag_runs_jobs_after_their_dependencies():
    """Inline (one worker): a job runs after the jobs it names, earliest ready job first; keys that name
    no job count as done; circular dependencies are refused instead of hanging."""
    from xtoken.mini.pool import _pool_dag

    order = []
    out = _pool_dag(
        lambda j: order.append(j) or j.upper(),
        ["run", "teacher", "cache"],
        ["run", "teacher", "cache"],
        [{"cache", "done-before"}, set(), {"teacher"}],
        workers=1,
    )
    assert order == ["teacher", "cache", "run"] and out == ["RUN", "TEACHER", "CACHE"]  # results in job order
    with pytest.raises(ValueError, match="circular"):
        _pool_dag(lambda j: j, ["a", "b"], ["a", "b"], [{"b"}, {"a"}], workers=1)


def test_test_sizes_never_change_training():
    """Training depends on the corpus stream only: the test sizes change the test split, never the training split;
    a larger arithmetic test set starts with the smaller one's items, and no test question is a training question."""
    from xtoken.mini.corpus import RESERVED_ARITH

    base = dict(n_train_arith=300, n_train_know=60, n_countries=6, n_people=10)
    small = make_corpus(MiniConfig.preset("smoke", n_test_arith=16, n_test_know=5, **base))
    big = make_corpus(MiniConfig.preset("smoke", n_test_arith=RESERVED_ARITH + 300, n_test_know=40, **base))
    assert _table_hash(small["train"]) == _table_hash(big["train"])
    arith = lambda dd: [r for r in dd["test"] if r["skill"] == "arithmetic"]  # noqa: E731
    a_small, a_big = arith(small), arith(big)
    assert len(a_small) == 16 and len(a_big) == RESERVED_ARITH + 300
    assert [r["question"] for r in a_small] == [r["question"] for r in a_big[:16]]
    q_big = [r["question"] for r in a_big]
    assert len(set(q_big)) == len(q_big)
    train_q = {q for q, s in zip(big["train"]["question"], big["train"]["skill"]) if s == "arithmetic"}
    assert not train_q & set(q_big)
    assert {r["kind"] for r in a_big[RESERVED_ARITH:]} == {"copy", "compare", "add", "count"}
    know = lambda dd: [r["question"] for r in dd["test"] if r["skill"] == "knowledge"]  # noqa: E731
    assert know(small) == know(big)[:5]
