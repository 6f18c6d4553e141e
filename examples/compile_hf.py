"""Compile a Hugging Face model with llmopt and compare it with eager PyTorch.

    python examples/compile_hf.py [--prompt "..."] [--lower inductor|eager] [--tolerance 2e-3]
    python examples/compile_hf.py --tiny        # a small random Llama (GQA) instead of SmolLM2

``torch.compile(model, backend="llmopt")`` rewrites every attention region of
the model to one ``llmopt::attention`` call (reading the shared key/value
heads of GQA directly) and lowers the rest with Inductor. This script runs
the model both ways on one prompt, prints what was rewritten and the largest
absolute difference of the logits, and exits 1 unless

* every decoder layer's attention was rewritten, and
* max |compiled - eager| <= --tolerance (fp32; only the summation order
  differs, so the difference is rounding-sized, far below what a wrong
  rewrite gives), and the next token (argmax of the last position) agrees.
"""

from __future__ import annotations

import argparse
import sys

import torch

import llmopt


def main(argv=None) -> int:
    args = _parse_args(argv)
    model, input_ids = _model_and_input(args)
    layers = model.config.num_hidden_layers

    with torch.no_grad():
        eager = model(input_ids).logits
        compiled = torch.compile(model, backend="llmopt", options={"lower": args.lower})
        fused = compiled(input_ids).logits

    report = llmopt.last_report()
    rewritten = report.count("attention") if report is not None else 0
    print(f"model: {args.model_name}, {layers} layers, input {tuple(input_ids.shape)}, lower={args.lower}")
    print(f"attention regions rewritten: {rewritten} of {layers}")
    for skipped in report.unmatched("attention") if report is not None else []:
        print(f"  left alone: {skipped}")

    diff = (fused - eager).abs().max().item()
    same_next = bool(torch.equal(fused[0, -1].argmax(), eager[0, -1].argmax()))
    ok = rewritten == layers and diff <= args.tolerance and same_next
    print(f"check: max |compiled - eager| = {diff:.2e} (tolerance {args.tolerance:g}), "
          f"same next token: {same_next}, {rewritten}/{layers} attention rewritten: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _model_and_input(args):
    if args.tiny:
        from llmopt.models import random_llama

        args.model_name = "random Llama (GQA, 2 layers, vocab 256)"
        model = random_llama("gqa")
        return model, torch.arange(3, 3 + 24)[None] % model.config.vocab_size
    from llmopt.models import load

    args.model_name = "SmolLM2-135M-Instruct"
    model, tokenizer = load("smollm2")
    return model, tokenizer(args.prompt, return_tensors="pt")["input_ids"]


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2 (seconds, for CI)")
    parser.add_argument("--prompt", default="The capital of France is Paris. The capital of Italy is")
    parser.add_argument("--lower", choices=("inductor", "eager"), default="inductor",
                        help="what runs the rewritten graph (default inductor)")
    parser.add_argument("--tolerance", type=float, default=2e-3, help="largest absolute logit difference allowed")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
