import os

import pytest
import torch

# Triton kernels are checked on CPU under the interpreter. Set before any
# test module imports triton, since @triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile limits carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model and its tokenizer, loaded once per session.

    Shared by every test that asks for it: wrap it (torch.compile), never
    change its weights or config. A missing model is a broken set-up
    (scripts/setup.sh installs it), so this fails rather than skips.
    """
    from llmopt.models import load_cached

    return load_cached("smollm2")
