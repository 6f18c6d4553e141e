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
