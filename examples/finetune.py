"""Fine-tune a causal LM with llmopt's Trainer and check that held-out perplexity drops.

    python examples/finetune.py [--steps 40] [--recompute selective] [--precision bf16]
    python examples/finetune.py --tiny     # a small random Llama on README.md, a few steps (CI)

Default: SmolLM2-135M-Instruct, compiled with ``backend="llmopt"``, trained on
``../shared/data/text/tempest.txt`` (packed into 256-token rows) and evaluated on
``macbeth.txt``, with AdamW, warm-up + cosine decay, gradient accumulation,
evaluation every few steps, early stopping and the best checkpoint restored
(files in --output-dir: log.jsonl, result.json, loss.png, best/, last/).
It prints the held-out perplexity before and after, and exits 1 unless it dropped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from llmopt.training import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "text"


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.tiny:
        from llmopt.models import random_llama
        from llmopt.training.command import ByteTokenizer

        model, tokenizer = random_llama(num_layers=2), ByteTokenizer()
        text = (REPO / "README.md").read_text()
        cut = len(text) * 9 // 10
        train, held_out = [tokenizer(text[:cut])["input_ids"]], [tokenizer(text[cut:])["input_ids"]]
        options = dict(max_steps=args.steps or 8, seq_len=128, micro_batch_size=4, grad_accum_steps=2, lr=3e-3,
                       warmup_steps=2, eval_every=4, compile_options={"lower": "eager"})
    else:
        from llmopt.models import load

        model, tokenizer = load("smollm2")
        model = model.float()
        train, held_out = str(TEXT / "tempest.txt"), str(TEXT / "macbeth.txt")
        options = dict(max_steps=args.steps or 40, seq_len=256, micro_batch_size=4, grad_accum_steps=2, lr=5e-5,
                       warmup_steps=4, eval_every=10)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="llmopt-finetune-")
    config = TrainConfig(**options, packing=True, schedule="cosine", min_lr=options["lr"] / 10, weight_decay=0.01,
                         patience=2, recompute=args.recompute, precision=args.precision, compile=not args.no_compile,
                         output_dir=output_dir, progress=not args.tiny)
    trainer = Trainer(model, config, train, eval_data=held_out, tokenizer=tokenizer)
    before = trainer.evaluate()["perplexity"]
    result = trainer.train()
    after = trainer.evaluate()["perplexity"]
    print(f"{len(result.steps)} steps, {result.tokens_per_second:.0f} tokens/s, best step {result.best_step}; "
          f"files in {output_dir}")
    ok = after < before
    print(f"check: held-out perplexity {before:.2f} -> {after:.2f}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small random Llama on README.md (seconds, for CI)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 40; 8 with --tiny)")
    parser.add_argument("--recompute", default="none", help="none, full, selective or a memory budget in [0, 1]")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--no-compile", action="store_true", help="train eagerly")
    parser.add_argument("--output-dir", help="where the run's files go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.recompute not in ("none", "full", "selective"):
        args.recompute = float(args.recompute)
    torch.manual_seed(0)
    return args


if __name__ == "__main__":
    sys.exit(main())
