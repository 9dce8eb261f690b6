"""xtoken.evaluate: lm-eval on a tiny saved model, fully offline, against a known answer key.

A 1-layer Llama over a restricted vocabulary memorises four question -> '#### answer' texts; lm-eval's
exact match must then be 1.0 on the true key and 0.0 on a wrong key, and its generations must equal
HF greedy generation on the same prompts.
"""

import json

import pytest
import torch

from xtoken.evaluate import MINI_TASKS, evaluate, load_lm, task_configs
from xtoken.mini.config import ModelSize
from xtoken.mini.models import LocalVocab, build_model, keep_ids_for, save_model

ITEMS = [
    ("How many coins does Mia have?", "347"),
    ("How many pens does Leo have?", "12"),
    ("What is the capital of Vaslo?", "Rinix"),
    ("How old is Ixdre Lomi?", "58"),
]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, llama):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("eval")
    texts = [f"{q}\n#### {a}\n\n" for q, a in ITEMS]
    vocab = LocalVocab("llama", llama, keep_ids_for(texts, llama))
    model = build_model("student", ModelSize(32, 1, 2), vocab.size, vocab.tok, seed=0)
    enc = vocab.tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_model(model, vocab, d / "model")
    for key, answers in (("right", [a for _, a in ITEMS]), ("wrong", ["1", "2", "Zosha", "3"])):
        (d / key).mkdir()
        for task in ("arithmetic", "knowledge"):
            with open(d / key / f"{task}_test.jsonl", "w") as f:
                for (q, _), a in zip(ITEMS, answers):
                    f.write(json.dumps({"question": q, "answer": a}) + "\n")
    return d, float(loss.detach())


def test_exact_match_against_answer_key(memorised):
    d, loss = memorised
    lm = load_lm(d / "model", batch_size=4)
    right = evaluate(d / "model", MINI_TASKS, data_dir=d / "right", lm=lm)
    wrong = evaluate(d / "model", MINI_TASKS, data_dir=d / "wrong", lm=lm)
    assert list(right.columns) == ["task", "filter", "metric", "value", "stderr", "n", "num_fewshot"]
    assert sorted(right["task"]) == sorted(MINI_TASKS)
    assert (right["metric"] == "exact_match").all() and (right["n"] == len(ITEMS)).all()
    assert right["value"].tolist() == [1.0, 1.0]
    assert wrong["value"].tolist() == [0.0, 0.0]
    limited = evaluate(d / "model", ["xtoken_mini_knowledge"], data_dir=d / "right", lm=lm, limit=2)
    assert limited["n"].tolist() == [2]


def test_generations_match_hf_greedy(memorised):
    from xtoken.mini.models import load_model

    d, _ = memorised
    df, raw = evaluate(
        d / "model", ["xtoken_mini_arithmetic"], data_dir=d / "right", batch_size=4, log_samples=True, return_raw=True
    )
    model, tok, _, _ = load_model(d / "model")
    for s in raw["samples"]["xtoken_mini_arithmetic"]:
        prompt = s["arguments"][0][0]
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
        assert s["resps"][0][0] == text.split("\n\n")[0]


def test_task_configs_need_data(tmp_path):
    with pytest.raises(ValueError):
        task_configs(["xtoken_mini_arithmetic"])
    with pytest.raises(FileNotFoundError):
        task_configs(["xtoken_mini_arithmetic"], data_dir=tmp_path)
    assert task_configs(["gsm8k"]) == ["gsm8k"]  # lm-eval's own tasks pass through by name


def test_reused_tokenizer_and_env_report_change_nothing(memorised):
    """Per-process reuse (the tokenizer of a local model directory, torch's environment report) gives the
    same generations, scores and report as lm-eval loading everything itself."""
    from lm_eval.models.huggingface import HFLM

    from xtoken import evaluate as ev

    d, _ = memorised
    plain = HFLM(pretrained=str(d / "model"), batch_size=4, device="cpu", dtype="float32", add_bos_token=True)
    runs = [evaluate(d / "model", MINI_TASKS, data_dir=d / "right", lm=plain, log_samples=True, return_raw=True)]
    for _ in range(2):
        runs.append(
            evaluate(d / "model", MINI_TASKS, data_dir=d / "right", batch_size=4, log_samples=True, return_raw=True)
        )
    assert load_lm(d / "model", batch_size=4).tokenizer is load_lm(d / "model", batch_size=4).tokenizer
    (df0, raw0), *rest = runs
    for df, raw in rest:
        assert df.equals(df0)
        assert raw["pretty_env_info"] == raw0["pretty_env_info"]
        for task in MINI_TASKS:
            assert [s["resps"] for s in raw["samples"][task]] == [s["resps"] for s in raw0["samples"][task]]
    assert len(ev._ENV_REPORT) == 1


def test_per_item_scores_and_teacher_forced_pass(memorised, tmp_path):
    """Per-item scores: lm-eval's exact match per item, the whole-solution match read from its generation, and
    the teacher-forced log p of the gold solution equal to a direct one-item computation on the training ids."""
    from xtoken.mini.items import score_items, teacher_forced

    d, _ = memorised
    for task in ("arithmetic", "knowledge"):
        with open(tmp_path / f"{task}_test.jsonl", "w") as f:
            for i, (q, a) in enumerate(ITEMS):
                f.write(
                    json.dumps({"idx": i, "kind": "k", "question": q, "answer": a, "text": f"{q}\n#### {a}\n\n"}) + "\n"
                )
    lm = load_lm(d / "model", batch_size=4)
    df, raw = evaluate(d / "model", MINI_TASKS, data_dir=tmp_path, lm=lm, log_samples=True, return_raw=True)
    items = score_items(lm, raw, batch=3)
    assert len(items) == 2 * len(ITEMS)
    assert items.exact_match.tolist() == [1.0] * 8 and items.solution_match.tolist() == [1.0] * 8
    assert (items.pred == items.gold).all() and (items.logp_solution <= 0).all()
    # knowledge-style items: the whole solution is the answer line
    assert (items.logp_solution == items.logp_answer).all() and (items.n_solution == items.n_answer).all()
    tok, model = lm.tokenizer, lm.model
    for q, a in ITEMS[:2]:
        full = tok(f"{q}\n#### {a}")["input_ids"]
        n_prompt = len(tok(f"{q}\n")["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        direct = sum(float(lp[t - 1, full[t]]) for t in range(n_prompt, len(full)))
        got = teacher_forced(model, tok, [q], [f"#### {a}"])
        assert got.logp_solution[0] == pytest.approx(direct, abs=1e-4)
