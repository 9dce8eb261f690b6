import shutil
from pathlib import Path

import pytest

from xtoken import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
NBVAL_SMOKE_WORK = REPO / "runs" / "nbval-smoke"  # where tests/nbval_smoke/*.ipynb train and write
NBVAL_PAPER_SMOKE_WORK = REPO / "runs" / "nbval-paper-smoke" / "work"  # tests/nbval_paper_smoke/*.ipynb


def pytest_sessionstart(session):
    """nbval re-executes tests/nbval_smoke/*.ipynb, whose grid reads finished runs back from their work dir:
    start every nbval session from an empty one so the comparison covers training, not a stale cache."""
    if session.config.getoption("--nbval", default=False):
        shutil.rmtree(NBVAL_SMOKE_WORK, ignore_errors=True)
        shutil.rmtree(NBVAL_PAPER_SMOKE_WORK, ignore_errors=True)


@pytest.fixture(scope="session")
def llama():
    return load_tokenizer("meta-llama/Llama-3.2-1B")


@pytest.fixture(scope="session")
def qwen():
    return load_tokenizer("Qwen/Qwen3-4B")


@pytest.fixture(scope="session")
def phi():
    return load_tokenizer("microsoft/Phi-4-mini-instruct")
