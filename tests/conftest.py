"""Shared test fixtures: paths to the optional ../shared data and small helpers."""

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a skip when a user's clone does not have it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not present at {path} (only the project's own machines have it)")
    return path


def shared_jsonl(*parts: str) -> Iterator[dict]:
    """The records of a JSONL file under ../shared/data, or a skip."""
    with open(shared_path(*parts), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


@pytest.fixture(scope="session")
def upstream_tokenizer():
    """MiniMind's own tokenizer from ../shared/data (the expected strings of several tests spell
    out its chat template), or a skip."""
    from model.tokenizer import Tokenizer

    return Tokenizer.from_dir(shared_path("minimind_tokenizer"))


@pytest.fixture
def one_thread_private_cache(tmp_path, monkeypatch):
    """Tiny models run fastest on one thread; the token cache stays inside the test's folder.
    Opt in per file: ``pytestmark = pytest.mark.usefixtures("one_thread_private_cache")``."""
    monkeypatch.setenv("MINIMIND_DATA_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
