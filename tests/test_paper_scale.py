"""The paper-scale path, run for real on offline stand-ins (`xtoken.standins`): random-weight models of the
real classes and vocabulary sizes in a Hugging Face cache under the real hub ids, a local corpus, local tasks.

The runs go through subprocesses because huggingface_hub reads HF_HOME once, at import."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xtoken.paper import (
    PAPER_TASKS,
    HubUnavailable,
    PaperConfig,
    load_causal_lm,
    load_prompt_stream,
    load_text_stream,
    pack_texts,
    paper_config,
    preflight,
    settings_by_name,
)
from xtoken.standins import activate_env, build_standins

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    build_standins(root)
    return root


def _python(code: str, root, timeout=600) -> str:
    env = dict(os.environ, **activate_env(root))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout


# ---- configuration -------------------------------------------------------------------------------


def test_paper_config_matches_the_paper(tmp_path):
    cfg = PaperConfig.preset("paper")
    assert (cfg.lr, cfg.weight_decay, cfg.betas, cfg.warmup_steps, cfg.steps) == (5e-5, 0.001, (0.9, 0.95), 250, 5000)
    assert (cfg.global_batch, cfg.micro_batch, cfg.max_length, cfg.temperature) == (64, 1, 2048, 1.0)
    assert cfg.dynamic_kd_scale and cfg.bf16 and cfg.tasks == PAPER_TASKS
    assert PAPER_TASKS == {"gsm8k": 5, "mmlu": 5, "arc_challenge": 25, "hellaswag": 10, "winogrande": 5}
    args = paper_config(str(tmp_path), n_gpus=8)
    assert args.lr_scheduler_type.value == "cosine" and args.save_total_limit == 2
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 64


@pytest.mark.parametrize("world,accumulation", [(1, 64), (2, 32), (8, 8), (64, 1)])
def test_global_batch_is_64_on_any_world_size(world, accumulation):
    assert PaperConfig().accumulation(world) == accumulation


def test_world_size_comes_from_the_launch(tmp_path, monkeypatch):
    from xtoken.paper import launch_world_size

    monkeypatch.setenv("WORLD_SIZE", "8")  # what torchrun / accelerate launch set
    assert PaperConfig().accumulation(launch_world_size()) == 8
    monkeypatch.delenv("WORLD_SIZE")
    args = PaperConfig().training_args(tmp_path)
    assert launch_world_size() == 1 and args.gradient_accumulation_steps == 64
    # streamed samples: each rank reads its own, no batch dispatch from rank 0 (the 2-process test runs it)
    assert args.accelerator_config.dispatch_batches is False


def test_a_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        PaperConfig(global_batch=64).accumulation(3)


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="steps"):
        PaperConfig.preset("paper", steps=0)
    with pytest.raises(TypeError, match="no field"):
        PaperConfig.preset("paper", stepz=3)
    with pytest.raises(ValueError, match="unknown preset"):
        PaperConfig.preset("huge")
    with pytest.raises(ValueError, match="max_new_tokens"):
        PaperConfig.preset("paper", max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt_format .* not a str.format template.*positional"):
        PaperConfig.preset("paper", prompt_format="Question: {}\nAnswer:")
    with pytest.raises(ValueError, match="completion_format .* not a str.format template"):
        PaperConfig.preset("paper", completion_format=" {answer")
    with pytest.raises(ValueError, match="stop_strings"):
        PaperConfig.preset("paper", stop_strings="\n\n")


def test_on_policy_settings_reach_the_trainer_by_name(tmp_path):
    """The on-policy experiment's settings are in the paper grid's catalogue, and a setting's lmbda and
    on_policy_ce, with the config's generation settings, become the run's XTokenConfig."""
    on, off = settings_by_name(["pkl_qwen3@on_policy_no_ce", "pkl_qwen3@arith"])
    assert (on.lmbda, on.on_policy_ce, on.data) == (1.0, False, "arithmetic_prompts")
    cfg = PaperConfig.preset("paper", max_new_tokens=200, stop_strings=["Question:"])
    args = cfg.training_args(tmp_path, world_size=1, **cfg.on_policy_args(on))
    assert (args.lmbda, args.on_policy_ce, args.max_new_tokens, args.stop_strings) == (1.0, False, 200, ["Question:"])
    assert cfg.training_args(tmp_path, world_size=1, **cfg.on_policy_args(off)).lmbda == 0.0


# ---- loading: messages that name today's commands ------------------------------------------------


def test_offline_model_load_names_the_hf_commands(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable) as err:
        load_causal_lm("meta-llama/Llama-3.2-1B")
    msg = str(err.value)
    assert "hf auth login" in msg and "hf download meta-llama/Llama-3.2-1B" in msg and "licence" in msg
    assert "huggingface-cli" not in msg


def test_offline_dataset_names_the_dataset_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="--repo-type dataset"):
        load_text_stream("nvidia/Nemotron-Pretraining-Specialized-v1.1")


def test_a_missing_local_folder_is_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_causal_lm(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_text_stream(str(tmp_path / "corpus-not-here"))


def test_on_policy_config_takes_350_steps_with_the_papers_warm_up_share():
    from xtoken.paper import ON_POLICY_STEPS, on_policy_config

    cfg = on_policy_config()
    assert (cfg.steps, cfg.warmup_steps, ON_POLICY_STEPS) == (350, 18, 350)  # 5% as the paper's 250 of 5,000
    assert (cfg.prompt_dataset, cfg.prompt_subset, cfg.global_batch) == ("openai/gsm8k", "main", 64)
    assert (on_policy_config(steps=1000).steps, on_policy_config(steps=1000).warmup_steps) == (1000, 50)
    standin = on_policy_config("some/standins")
    assert (standin.steps, standin.warmup_steps, standin.max_new_tokens) == (2, 0, 8)
    assert standin.prompt_dataset.endswith("standin_gsm8k_train.jsonl") and standin.prompt_subset is None


def test_preflight_names_the_prompt_dataset_only_for_settings_that_read_it(tmp_path):
    code = (
        "from xtoken import paper\n"
        "cfg = paper.PaperConfig.preset('paper', offline=True)\n"
        "for names in (['pkl_qwen3@on_policy'], ['pkl_qwen3']):\n"
        "    try:\n"
        "        paper.preflight(cfg, paper.settings_by_name(names))\n"
        "    except paper.HubUnavailable as e:\n"
        "        print(names, 'openai/gsm8k' in str(e), 'Nemotron' in str(e))\n"
    )
    out = _python(code, tmp_path)
    assert "['pkl_qwen3@on_policy'] True False" in out and "['pkl_qwen3'] False True" in out


def test_preflight_lists_every_missing_checkpoint_offline(tmp_path):
    """With an empty cache every missing model and the dataset are named, each with its command, at once."""
    out = _python(
        "from xtoken import paper\n"
        "cfg = paper.PaperConfig.preset('paper', offline=True)\n"
        "try:\n"
        "    paper.preflight(cfg, paper.settings_by_name(['phi_hkl+qwen3_pkl@static']))\n"
        "except paper.HubUnavailable as e:\n"
        "    print(e)\n",
        tmp_path,
    )
    for name in (
        "meta-llama/Llama-3.2-1B",
        "Qwen/Qwen3-4B",
        "microsoft/Phi-4-mini-instruct",
        "nvidia/Nemotron-Pretraining-Specialized-v1.1",
    ):
        assert f"hf download {name}" in out
    assert "Llama-3.2-3B" not in out  # not used by this setting


def test_unknown_setting_and_teacher_are_refused():
    with pytest.raises(KeyError, match="unknown setting 'pkl_gpt4'"):
        settings_by_name(["pkl_qwen3", "pkl_gpt4"])
    cfg = PaperConfig.preset("paper", teachers={"qwen3": "Qwen/Qwen3-4B"})
    with pytest.raises(HubUnavailable, match="teacher 'phi'"):
        preflight(cfg, settings_by_name(["hkl_phi"]))


def test_a_w_file_for_another_teacher_is_refused_before_any_model_loads(monkeypatch):
    from xtoken.projection import ProjectionMismatch

    # online (other tests may have left offline mode on): only the W check can refuse this grid
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    phi_w = REPO / "results" / "W_Llama-3.2-1B_to_Phi-4-mini-instruct.safetensors"
    cfg = PaperConfig.preset("paper", projections={"qwen3": str(phi_w)})
    with pytest.raises(ProjectionMismatch):
        preflight(cfg, settings_by_name(["pkl_qwen3"]))


# ---- data: packing -------------------------------------------------------------------------------


def test_packing_keeps_every_token_and_cuts_all_sides_at_one_character(llama):
    """Consecutive samples of max_length student tokens covering the joined stream without a gap; the
    collator then gives the student exactly max_length tokens and the teacher the same characters."""
    from xtoken.train import DistillCollator

    docs = [
        f"Document {i}: the river carried {i * 37} tons of salt to Größenstadt; "
        f"naïve traders counted 1,{i:03d} coins. " * (3 + i % 5)
        for i in range(40)
    ]
    samples = [s["text"] for s in pack_texts(docs, llama, 64, block_chars=700)]
    joined = "\n\n".join(docs)
    assert "".join(samples) == joined[: len("".join(samples))]  # consecutive, nothing dropped
    assert len(joined) - len("".join(samples)) < 400  # only the last partial sample's text
    col = DistillCollator(llama, [], max_length=64)
    student = col._student_ids(samples)  # (ids, the text every teacher sees) per sample
    full = [len(ids) == 64 and cut == text for (ids, cut), text in zip(student, samples)]
    assert sum(full) >= 0.95 * len(full), [len(ids) for ids, _ in student]


def test_local_corpus_streams_one_shard_per_file(standins):
    rows = load_text_stream(str(standins / "corpus"))
    assert rows.n_shards == 4
    assert len(list(rows)) == 64


def test_prompt_rows_render_gsm8k_and_refuse_a_missing_column(standins):
    """The on-policy rows: lm-eval's GSM8k prompt and its answer, one row per question, nothing packed."""
    f = str(standins / "tasks" / "standin_gsm8k_train.jsonl")
    rows = list(load_prompt_stream(f))
    assert len(rows) == 32 and set(rows[0]) == {"prompt", "completion"}
    first = json.loads(Path(f).read_text().splitlines()[0])
    assert rows[0]["prompt"] == f"Question: {first['question']}\nAnswer:"
    assert rows[0]["completion"] == f" {first['answer']}" and "\n#### " in rows[0]["completion"]
    with pytest.raises(KeyError, match=r"no column\(s\) \['query'\]"):
        load_prompt_stream(f, prompt_format="Q: {query}\nA:")


# ---- W against the model's logit width -------------------------------------------------------------


def test_w_has_the_models_logit_width_whatever_the_tokenizer_source(standins, llama, tmp_path):
    """A tokenizer read from a local folder knows 151,669 Qwen3 tokens; W takes the model's 151,936 columns."""
    from transformers import AutoTokenizer

    from xtoken.paper import logit_width, projection_for

    snap = next((standins / "hf_home" / "hub" / "models--Qwen--Qwen3-4B" / "snapshots").iterdir())
    local = AutoTokenizer.from_pretrained(snap)
    assert len(local) == 151669
    W = projection_for(llama, local, logit_width(str(snap)), tmp_path)
    assert W.teacher_vocab_size == 151936
    again = projection_for(llama, local, 151936, tmp_path)  # read from the cache, same W
    assert again.digest() == W.digest()


# ---- the runs themselves ---------------------------------------------------------------------------


def test_one_run_trains_fp32_master_weights_and_records_it(standins, tmp_path):
    """One stand-in run end to end in bf16 autocast: every weight tensor moves, masters stay fp32, the
    record and lm-eval's raw JSON are written, a second call reads the run back."""
    code = (
        f"from xtoken import paper\n"
        f"cfg = paper.grid_config({str(standins)!r})\n"
        f"r = paper.run_setting(cfg, 'pkl_qwen3', 0, {str(tmp_path)!r})\n"
    )
    _python(code, standins)
    d = tmp_path / "runs" / "pkl_qwen3" / "seed0"
    r = json.loads((d / "result.json").read_text())
    rec = r["record"]
    assert rec["student_master_dtype"] == "float32" and rec["changed_tensor_share"] == 1.0
    # 2 steps x global batch 2, plus the one batch accelerate reads ahead to detect the end of the data
    assert rec["samples_collated_per_rank"] == [4 + 1] and rec["world_size"] == 1
    assert rec["accumulation"] == 2 and set(rec["w_digests"]) == {"qwen3"}
    assert {"xtoken_standin_gsm8k", "xtoken_standin_arc"} <= set(r)
    raw = json.loads((d / "lm_eval_results.json").read_text())
    assert raw["configs"]["xtoken_standin_gsm8k"]["num_fewshot"] == 5
    assert raw["configs"]["xtoken_standin_arc"]["num_fewshot"] == 25
    assert (d / "model" / "config.json").exists() and (d / "model" / "tokenizer.json").exists()
    assert len(list((d / "trainer").glob("checkpoint-*"))) <= 2  # save_total_limit
    _python(code, standins)  # finished: read back, not retrained
    assert json.loads((d / "result.json").read_text()) == r


def test_an_on_policy_run_trains_on_the_students_own_text(standins, tmp_path):
    """``pkl_qwen3@on_policy_no_ce`` and its off-policy twin ``pkl_qwen3@arith`` read the same GSM8k rows; only the
    first generates (every logged step on-policy, 8 = max_new_tokens tokens per row from a random-weight student,
    which never writes a stop text), and its on-policy batches train KD alone."""
    code = (
        f"from xtoken import paper\n"
        f"cfg = paper.grid_config({str(standins)!r})\n"
        f"paper.run_grid(cfg, ['pkl_qwen3@on_policy_no_ce', 'pkl_qwen3@arith'], work_dir={str(tmp_path)!r})\n"
    )
    _python(code, standins)
    on, off = (
        json.loads((tmp_path / "runs" / name / "seed0" / "result.json").read_text())
        for name in ("pkl_qwen3@on_policy_no_ce", "pkl_qwen3@arith")
    )
    steps = [h for h in on["log_history"] if "loss" in h]
    assert len(steps) == 2 and all(h["on_policy"] == 1.0 and h["gen_tokens"] == 8.0 for h in steps)
    assert len([h for h in off["log_history"] if "loss" in h]) == 2
    assert not any("gen_tokens" in h or h.get("on_policy") for h in off["log_history"])
    assert on["record"]["texts_digest_per_rank"] == off["record"]["texts_digest_per_rank"]  # the same rows
    assert on["record"]["samples_collated_per_rank"] == [4 + 1] and on["record"]["tokens_per_s"] is None
    assert on["record"]["config"]["stop_strings"] == ["Question:", "\n\n"]


def test_two_processes_read_different_samples_and_agree(standins, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) on the streamed corpus: global batch kept, ranks read disjoint
    samples, DDP keeps their weights identical, one evaluation on rank 0."""
    code = (
        f"from xtoken import paper\n"
        f"cfg = paper.grid_config({str(standins)!r}, nproc_per_node=2)\n"
        f"paper.run_grid(cfg, ['hkl_phi'], work_dir={str(tmp_path)!r})\n"
    )
    _python(code, standins, timeout=900)
    rec = json.loads((tmp_path / "runs" / "hkl_phi" / "seed0" / "result.json").read_text())["record"]
    assert rec["world_size"] == 2 and rec["accumulation"] == 1 and rec["global_batch"] == 2
    assert rec["samples_collated_per_rank"] == [2 + 1, 2 + 1]  # 2 steps x 1 sample per rank + read-ahead
    assert len(set(rec["texts_digest_per_rank"])) == 2
    assert len(set(rec["params_digest_per_rank"])) == 1
    assert len(rec["peak_memory_gb_per_rank"]) == 2
