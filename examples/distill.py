"""Recover a 2:4-pruned model by distilling it from the dense one.

    python examples/distill.py [--steps 20] [--loss forward_kl|reverse_kl|jsd] [--temperature 1] [--compile]
    python examples/distill.py --tiny       # a small random Llama and random tokens instead of SmolLM2

The teacher is the model as loaded (fp32); the student is a copy pruned to 2:4
sparsity (``llmopt.pruning.prune_model``, magnitude scores, every linear but
``lm_head``). ``llmopt.training.distill`` trains the student on the teacher's
next-token distributions, with the pruned weights held at zero
(``freeze_pruned_zeros``). SmolLM2 trains on windows of macbeth.txt and is
scored on tempest.txt (another play, not trained on); the tiny setting uses
random token sequences.

The script prints the held-out perplexity and the KL divergence from the
teacher, before and after, and exits 1 unless distillation lowered the KL,
every pruned weight is still zero and (SmolLM2) the perplexity did not rise.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmopt.pruning import PruneConfig, prune_model
from llmopt.training import TrainConfig
from llmopt.training.distill import DistillConfig, distill, freeze_pruned_zeros

TEXTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def main(argv=None) -> int:
    args = _parse_args(argv)
    teacher, train, heldout = _teacher_and_data(args)
    student = prune_model(copy.deepcopy(teacher), PruneConfig(method="magnitude", pattern="2:4"))
    zeros = {name: module.weight == 0 for name, module in student.named_modules()
             if isinstance(module, torch.nn.Linear) and "lm_head" not in name}
    freeze_pruned_zeros(student)

    before = _scores(student, teacher, heldout)
    config = TrainConfig(max_steps=args.steps, micro_batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                         warmup_steps=min(2, args.steps - 1), schedule="constant", compile=args.compile,
                         compile_options={"lower": args.lower}, seed=0)
    result = distill(student, teacher, train, DistillConfig(loss=args.loss, temperature=args.temperature,
                                                            ce_weight=args.ce_weight), train_config=config)
    after = _scores(student, teacher, heldout)
    kept = all(bool((dict(student.named_modules())[name].weight[mask] == 0).all()) for name, mask in zeros.items())

    print(f"model: {args.model_name}; student: 2:4 magnitude-pruned copy; {len(result.steps)} steps of "
          f"{args.batch} x {args.seq_len} tokens, {args.loss}, T={args.temperature:g}, ce_weight={args.ce_weight:g} "
          f"({result.train_seconds:.0f} s)")
    print(f"held-out perplexity: teacher {before['teacher_ppl']:.2f}, student {before['ppl']:.2f} -> {after['ppl']:.2f}")
    print(f"held-out KL(teacher || student) per token: {before['kl']:.4f} -> {after['kl']:.4f}")
    # random tokens have no perplexity worth keeping low: the tiny check is the KL and the zeros
    ok = after["kl"] < before["kl"] and kept and (args.tiny or after["ppl"] <= before["ppl"])
    print(f"check: KL to the teacher {before['kl']:.4f} -> {after['kl']:.4f}, perplexity {before['ppl']:.2f} -> "
          f"{after['ppl']:.2f}, 2:4 zeros kept: {kept}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _teacher_and_data(args):
    if args.tiny:
        from llmopt.models import random_llama

        teacher = random_llama(num_layers=2, seed=0)
        g = torch.Generator().manual_seed(0)
        train = [torch.randint(0, 256, (args.seq_len,), generator=g) for _ in range(16)]
        heldout = torch.stack([torch.randint(0, 256, (args.seq_len,), generator=g) for _ in range(4)])
        args.model_name = "random llama (tiny)"
        return teacher, train, heldout
    from llmopt.models import load

    teacher, tokenizer = load("smollm2")

    def windows(name, limit=None):
        ids = torch.tensor(tokenizer((TEXTS / name).read_text(), add_special_tokens=False)["input_ids"])
        ids = ids[:limit] if limit else ids
        return [w for w in ids.split(args.seq_len) if w.numel() == args.seq_len]

    args.model_name = "SmolLM2-135M"
    return teacher, windows("macbeth.txt"), torch.stack(windows("tempest.txt", 2048))


@torch.no_grad()
def _scores(student, teacher, ids):
    student.eval()
    teacher.eval()
    s = student(ids).logits[:, :-1].float()
    t = teacher(ids).logits[:, :-1].float()
    targets = ids[:, 1:].reshape(-1)
    kl = F.kl_div(F.log_softmax(s, -1).reshape(-1, s.shape[-1]), F.log_softmax(t, -1).reshape(-1, t.shape[-1]),
                  log_target=True, reduction="batchmean")
    return {"ppl": math.exp(F.cross_entropy(s.reshape(-1, s.shape[-1]), targets).item()),
            "teacher_ppl": math.exp(F.cross_entropy(t.reshape(-1, t.shape[-1]), targets).item()),
            "kl": kl.item()}


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small random Llama and random tokens")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; --tiny 8)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; --tiny 32)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-4; --tiny 3e-3)")
    parser.add_argument("--loss", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.0, help="weight of the hard-label CE (default 0)")
    parser.add_argument("--compile", action="store_true", help='train through torch.compile(backend="llmopt")')
    parser.add_argument("--lower", choices=("inductor", "eager"), default="inductor")
    args = parser.parse_args(argv)
    args.steps = args.steps or (8 if args.tiny else 20)
    args.seq_len = args.seq_len or (32 if args.tiny else 128)
    args.lr = args.lr or (3e-3 if args.tiny else 2e-4)
    return args


if __name__ == "__main__":
    sys.exit(main())
