"""The paper-scale path is real up to the download: configs match the paper, offline fails clearly."""
import pytest

from xtoken.paper import PAPER, PAPER_TASKS, HubUnavailable, load_causal_lm, paper_config, stream_pretraining_text


def test_paper_config_matches_the_paper(tmp_path):
    cfg = paper_config(str(tmp_path), n_gpus=8, bf16=False)    # bf16 needs a GPU to construct on some CPUs
    assert cfg.learning_rate == 5e-5 and cfg.weight_decay == 0.001
    assert (cfg.adam_beta1, cfg.adam_beta2) == (0.9, 0.95)
    assert cfg.warmup_steps == 250 and cfg.lr_scheduler_type.value == "cosine" and cfg.max_steps == 5000
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * 8 == PAPER["global_batch"]
    assert cfg.dynamic_kd_scale and cfg.temperature == 1.0 and cfg.max_length == 2048
    assert "gsm8k" in PAPER_TASKS


def test_offline_model_load_fails_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="huggingface-cli login"):
        load_causal_lm("meta-llama/Llama-3.2-1B")


def test_offline_dataset_stream_fails_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="Offline mode is on"):
        stream_pretraining_text()


def test_local_model_directory_loads(tmp_path):
    """The same loader takes a local directory: a tiny real Llama saved here loads through it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path), dtype="float32")
    assert model.config.vocab_size == 64
