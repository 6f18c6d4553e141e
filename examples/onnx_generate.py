"""Generate text from SmolLM2 with ONNX Runtime alone.

    python examples/onnx_generate.py "What is the capital of France?" [--onnx smollm2.onnx]
        [--max-tokens 64] [--quantize int4] [--check]
    python examples/onnx_generate.py --tiny [--quantize int4]   # a small random Llama, checked (for CI)

If the ONNX file is missing, it is exported first with ``llmopt.export_onnx``
(the one step that uses PyTorch). Generation then runs in onnxruntime, driven
with numpy (``llmopt.onnx.OnnxCausalLM``): a prefill of the chat prompt with
an empty cache, then one token per step, feeding back the ``present.*``
outputs as ``past_key_values.*``, greedy, until ``<|im_end|>`` or
``--max-tokens``.

``--check`` also generates with llmopt in PyTorch (``torch.compile(backend="llmopt")``,
eager lowering, the same options) and reports whether the tokens are identical;
the script then exits 1 if they are not.

``--tiny`` exports a random 2-layer Llama (GQA) to a temporary file instead and
generates from token ids (no tokenizer), always with the check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> dict:
    args = _parse_args(argv)
    options = {"quantize": args.quantize, "group_size": args.group_size} if args.quantize else {}
    if args.tiny:
        return tiny(args.max_tokens, options)
    path = Path(args.onnx)
    model = None
    if not path.exists() or args.check:
        from llmopt.models import load

        model, tokenizer = load("smollm2")
    else:
        tokenizer = _tokenizer()
    if not path.exists():
        import llmopt

        print(f"exporting SmolLM2 to {path} with llmopt (options {options}) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        exported = llmopt.export_onnx(model, path, options=options)
        print(f"{exported} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    result = generate_with_onnxruntime(path, tokenizer, args.prompt, args.max_tokens)
    print(result["text"])
    if args.check:
        result["llmopt_tokens"] = llmopt_greedy(model, result["prompt_ids"], args.max_tokens,
                                                result["stop"], options)
        result["same"] = result["llmopt_tokens"] == result["tokens"]
        print(f"[llmopt in PyTorch gives {'the same' if result['same'] else 'DIFFERENT'} tokens]", file=sys.stderr)
    return result


def generate_with_onnxruntime(path, tokenizer, prompt: str, max_tokens: int) -> dict:
    """The chat reply to ``prompt``, greedy, computed by onnxruntime (numpy around it)."""
    from llmopt.onnx.runtime import GreedyStats, OnnxCausalLM

    prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True)["input_ids"])
    stop = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    session = OnnxCausalLM(str(path))
    stats = GreedyStats()
    tokens = session.generate_greedy(prompt_ids, max_tokens, eos_token_ids=stop, stats=stats)
    print(f"[onnxruntime: {stats.new_tokens} tokens, prefill {stats.prefill_s:.2f} s, "
          f"{stats.decode_tokens_per_s:.1f} tokens/s decode]", file=sys.stderr)
    return {"prompt_ids": prompt_ids, "stop": stop, "tokens": tokens,
            "text": tokenizer.decode(tokens, skip_special_tokens=True), "llmopt_tokens": None, "same": None}


def tiny(max_tokens: int, options: dict) -> dict:
    """Export a random 2-layer Llama, generate greedily with onnxruntime, check against llmopt."""
    import tempfile

    import llmopt
    from llmopt.models import random_llama
    from llmopt.onnx.runtime import OnnxCausalLM

    model = random_llama("gqa")
    prompt_ids = [(7 * i + 3) % model.config.vocab_size for i in range(12)]
    with tempfile.TemporaryDirectory() as scratch:
        exported = llmopt.export_onnx(model, Path(scratch) / "tiny.onnx", options=options)
        tokens = OnnxCausalLM(str(exported.path)).generate_greedy(prompt_ids, max_tokens)
    expected = llmopt_greedy(model, prompt_ids, max_tokens, set(), options)
    same = tokens == expected
    print(f"random Llama (GQA, 2 layers), options {options}: onnxruntime generated {tokens}")
    print(f"check: onnxruntime's greedy tokens {'equal' if same else 'DIFFER FROM'} llmopt's in PyTorch: "
          f"{'OK' if same else 'FAILED'}")
    return {"prompt_ids": prompt_ids, "stop": set(), "tokens": tokens, "text": None,
            "llmopt_tokens": expected, "same": same}


def _tokenizer():
    from transformers import AutoTokenizer

    from llmopt.models.smollm2 import gguf_path

    gguf = gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def llmopt_greedy(model, prompt_ids, max_tokens, stop, options) -> list[int]:
    """llmopt's greedy tokens in PyTorch, for the same prompt and stop tokens."""
    import torch

    from llmopt.runtime.generate import generate

    compiled = torch.compile(model, backend="llmopt", options={"lower": "eager", **options})
    tokens, _ = generate(compiled, None, torch.tensor([prompt_ids]), max_tokens, eos_token_ids=stop)
    return tokens


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--onnx", default="smollm2.onnx", help="ONNX file (exported first if missing)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quantize", choices=("int4", "int8"), help="when exporting: weight-only quantization")
    parser.add_argument("--group-size", type=int, default=32, help="int4 group length when exporting (default 32)")
    parser.add_argument("--check", action="store_true", help="compare with llmopt's greedy tokens in PyTorch")
    parser.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2 (for CI)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["same"] in (None, True) else 1)
