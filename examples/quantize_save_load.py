"""Quantize a model to int4 with calibration text (GPTQ), save it, reload it, run it.

    python examples/quantize_save_load.py [--calibration ../shared/data/text/tempest.txt]
        [--text tests/data/macbeth_excerpt.txt] [--group-size 128] [--out smollm2.int4.safetensors]
    python examples/quantize_save_load.py --tiny    # a small random Llama instead of SmolLM2

Steps: tokenize the calibration text (``--calibration-tokens`` of it), run
``quantize_weights(model, QuantConfig("int4", ...), calibration=token_batches(ids))``
(GPTQ, the default int4 method when calibration is given), ``save_quantized``
to a safetensors file, then compile the model twice with
``options={"quantize": "int4", "quantized_weights": ...}``: once with the
freshly quantized weights (the object), once with the file, which is loaded
as it is, never re-quantized. Both score the same held-out text (``--text``,
not the calibration text), next to the float model.

Exits 1 unless the reloaded model's logits are bit-identical to the freshly
quantized model's. The perplexities are printed for information only (how
much int4 costs is measured in bench/quality.py; see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from llmopt.quantization import QuantConfig, quantize_weights, save_quantized, token_batches

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    args = _parse_args(argv)
    model, encode = _model_and_encoder(args)
    calibration = encode(Path(args.calibration).read_text())[:args.calibration_tokens]
    held_out = encode(Path(args.text).read_text())[:args.eval_tokens][None]
    print(f"model: {args.model_name}; calibration: {calibration.numel()} tokens of {args.calibration}; "
          f"held out: {held_out.shape[1]} tokens of {args.text}")

    config = QuantConfig("int4", group_size=args.group_size)
    weights = quantize_weights(model, config, calibration=token_batches(calibration))
    scratch = tempfile.TemporaryDirectory()
    out = Path(args.out) if args.out else Path(scratch.name) / "model.int4.safetensors"
    save_quantized(weights, out)
    print(f"quantized {len(weights.layers)} linear layers ({weights.label()}, {weights.method}); "
          f"saved {out} ({out.stat().st_size / 2**20:.1f} MiB)")

    float_logits = _logits(model, held_out, None)
    fresh = _logits(model, held_out, {"quantize": "int4", "group_size": args.group_size, "quantized_weights": weights})
    reloaded = _logits(model, held_out, {"quantize": "int4", "group_size": args.group_size,
                                         "quantized_weights": str(out)})
    for name, logits in (("float", float_logits), ("int4, fresh", fresh), ("int4, reloaded", reloaded)):
        print(f"  perplexity on the held-out text, {name}: {_perplexity(logits, held_out):.3f}")

    identical = torch.equal(fresh, reloaded)
    print(f"check: reloaded int4 logits {'equal' if identical else 'DIFFER FROM'} the freshly quantized ones "
          f"(max |diff| {(fresh - reloaded).abs().max().item():.2e}): {'OK' if identical else 'FAILED'}")
    scratch.cleanup()
    return 0 if identical else 1


def _logits(model, input_ids, options):
    """Logits of ``model`` compiled with llmopt (``options`` None: the float model, eager)."""
    torch._dynamo.reset()
    with torch.no_grad():
        if options is None:
            return model(input_ids).logits
        compiled = torch.compile(model, backend="llmopt", options={"lower": "eager", **options})
        return compiled(input_ids).logits


def _perplexity(logits, ids) -> float:
    return math.exp(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())


def _model_and_encoder(args):
    if args.tiny:
        from llmopt.models import random_llama

        args.model_name = "random Llama (GQA, 2 layers, vocab 256; tokens are the text's bytes)"
        return random_llama("gqa"), lambda text: torch.tensor(list(text.encode()))
    from llmopt.models import load

    args.model_name = "SmolLM2-135M-Instruct"
    model, tokenizer = load("smollm2")
    return model, lambda text: tokenizer(text, return_tensors="pt")["input_ids"][0]


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2 (seconds, for CI)")
    parser.add_argument("--calibration", default=str(REPO.parent / "shared" / "data" / "text" / "tempest.txt"),
                        help="calibration text file (default ../shared/data/text/tempest.txt)")
    parser.add_argument("--calibration-tokens", type=int, default=2048, help="tokens of it used (default 2048)")
    parser.add_argument("--text", default=str(REPO / "tests" / "data" / "macbeth_excerpt.txt"),
                        help="held-out text scored with each model")
    parser.add_argument("--eval-tokens", type=int, default=512, help="tokens of it scored (default 512)")
    parser.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, 256))
    parser.add_argument("--out", help="where to save the quantized weights (default: a temporary file)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
