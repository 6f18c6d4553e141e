"""One rank of tests/training/test_distributed.py, launched by torchrun (gloo on CPU)."""

import json
import sys

import torch
import torch.distributed as dist

from llmopt.models import random_llama
from llmopt.training import TrainConfig, Trainer


def sequences(count, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 30, (count,), generator=generator)
    return [torch.randint(0, 256, (int(n),), generator=generator) for n in lengths]


def config(micro_batch_size):
    return TrainConfig(max_steps=3, micro_batch_size=micro_batch_size, grad_accum_steps=2, lr=1e-3, compile=False,
                       l2_penalty=0.01, max_grad_norm=0.5, eval_every=3, restore_best=False)


def run(micro_batch_size):
    model = random_llama(num_layers=2).double()
    result = Trainer(model, config(micro_batch_size), sequences(24, 0), eval_data=sequences(5, 1)).train()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {"losses": result.losses, "eval": result.eval_losses, "checksum": checksum}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    out = run(micro_batch_size=2)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()
