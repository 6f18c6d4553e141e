import pytest


@pytest.fixture(autouse=True)
def _llmopt_quantized_linears_in_fp32(monkeypatch):
    """llmopt runs fp32 int4/int8 layers in bf16 on CPU by default (for speed); the
    export computes in fp32 (MatMulNBits, accuracy_level 0), so references taken
    from llmopt use its fp32 path: the comparison is then of the same arithmetic."""
    monkeypatch.setenv("LLMOPT_QUANT_CPU_DTYPE", "float32")
