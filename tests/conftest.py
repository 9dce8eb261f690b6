import pytest

from xtoken import load_tokenizer


@pytest.fixture(scope="session")
def llama():
    return load_tokenizer("meta-llama/Llama-3.2-1B")


@pytest.fixture(scope="session")
def qwen():
    return load_tokenizer("Qwen/Qwen3-4B")


@pytest.fixture(scope="session")
def phi():
    return load_tokenizer("microsoft/Phi-4-mini-instruct")
