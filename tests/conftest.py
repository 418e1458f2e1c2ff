"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models step several times faster on one intra-op thread than on a shared pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def save_tiny_lm():
    """``save(path, seed=0) -> path``: write a tiny random GPT-2 and its byte-level tokenizer to ``path``."""
    from tests.tiny_models import tiny_causal_lm

    def save(path, seed: int = 0):
        model, tokenizer = tiny_causal_lm(seed=seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return save
