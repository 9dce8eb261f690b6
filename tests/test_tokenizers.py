"""The offline rebuilds reproduce the reference tokenizers id for id.

Fixtures (tests/fixtures/token_ids.json) come from independent sources; see
tests/fixtures/make_token_fixtures.py for how each family's ids were produced.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xtoken import TokenizerNotFound, load_tokenizer, tokenizer_fingerprint

FIX = json.loads((Path(__file__).parent / "fixtures" / "token_ids.json").read_text())
FAMILY = {"llama3": "llama", "qwen3": "qwen", "o200k": "phi"}


@pytest.mark.parametrize("family", FAMILY)
def test_hard_strings_match_independent_fixtures(family, request):
    tok = request.getfixturevalue(FAMILY[family])
    for text, want in zip(FIX["strings"], FIX["ids"][family]):
        got = tok(text, add_special_tokens=False)["input_ids"]
        assert got == want, (family, text)
        assert tok.decode(got) == text or family == "qwen3"  # Qwen normalizes to NFC


@pytest.mark.parametrize("family", FAMILY)
def test_special_tokens_and_bos(family, request):
    tok = request.getfixturevalue(FAMILY[family])
    for text, want in zip(FIX["special_strings"][family], FIX["special_ids"][family]):
        assert tok(text)["input_ids"] == want, (family, text)


def test_vocabulary_sizes_and_roles(llama, qwen, phi):
    assert len(llama) == 128256 and llama.bos_token_id == 128000 and llama.eos_token_id == 128001
    assert len(qwen) == 151669 and qwen.bos_token is None and qwen.pad_token_id == 151643
    assert qwen.convert_tokens_to_ids("<|im_end|>") == 151645
    assert phi.convert_tokens_to_ids("<|endoftext|>") == 199999
    assert phi.convert_tokens_to_ids("<|endofprompt|>") == 200018
    # Llama packs digits by 3, Qwen splits every digit, o200k packs by 3 (Table 8's premise)
    assert llama.tokenize("2024") == ["202", "4"]
    assert qwen.tokenize("201") == ["2", "0", "1"]
    assert phi.tokenize("201") == ["201"]


def test_same_family_aliases_share_a_fingerprint(llama):
    assert tokenizer_fingerprint(load_tokenizer("meta-llama/Llama-3.2-3B")) == tokenizer_fingerprint(llama)
    assert tokenizer_fingerprint(load_tokenizer("llama-3.2")) == tokenizer_fingerprint(llama)


def test_unknown_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerNotFound, match="not in the local Hugging Face cache"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="source must be"):
        load_tokenizer("qwen3", source="somewhere")


def test_local_directory_goes_through_autotokenizer(tmp_path, qwen):
    qwen.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again("x = 201")["input_ids"] == qwen("x = 201")["input_ids"]


def _load_qwen_in_a_new_process(cache, hash_seed):
    """Load Qwen3's tokenizer in a fresh interpreter with this PYTHONHASHSEED; the cache's json files after it."""
    env = dict(os.environ, XTOKEN_CACHE=str(cache), PYTHONHASHSEED=str(hash_seed), HF_HUB_OFFLINE="1")
    code = "from xtoken import load_tokenizer; print(load_tokenizer('Qwen/Qwen3-4B')('x = 201')['input_ids'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[87, 284, 220, 17, 15, 16]"
    return sorted((cache / "tokenizers").glob("*.json"))


def test_rebuild_cache_key_does_not_depend_on_the_hash_seed(tmp_path):
    first = _load_qwen_in_a_new_process(tmp_path, 1)
    assert len(first) == 1 and first[0].name.startswith("qwen3-")
    before = first[0].stat()
    second = _load_qwen_in_a_new_process(tmp_path, 2)
    assert [p.name for p in second] == [first[0].name]
    after = second[0].stat()
    # read, not rebuilt: a rebuild writes a temporary file and renames it over the entry (a new inode)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_rebuild_cache_keeps_one_entry_per_family(tmp_path, monkeypatch, qwen):
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path))
    cache = tmp_path / "tokenizers"
    cache.mkdir()
    stale = [cache / "qwen3-0123456789abcdef.json", cache / "qwen3-fedcba9876543210.json"]
    for p in stale:
        p.write_text("{}")
    (cache / "qwen3-0123456789abcdef.tmp4242").write_text("{")  # left by a killed builder
    os.utime(cache / "qwen3-0123456789abcdef.tmp4242", (0, 0))
    other = cache / "llama3-0123456789abcdef.json"
    other.write_text("{}")
    tok = load_tokenizer("Qwen/Qwen3-4B")
    assert tok("x = 201")["input_ids"] == qwen("x = 201")["input_ids"]
    left = sorted(p.name for p in cache.iterdir())
    assert len([n for n in left if n.startswith("qwen3-")]) == 1 and other.name in left
    assert not any(p.exists() for p in stale)


def test_empty_directory_is_not_a_tokenizer(tmp_path):
    with pytest.raises(TokenizerNotFound, match=f"no tokenizer files in {tmp_path}"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerNotFound, match=f"could not load a tokenizer from {tmp_path}"):
        load_tokenizer(str(tmp_path))
