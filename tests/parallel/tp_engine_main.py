"""A tensor-parallel engine in its own processes, for tests/parallel/test_tp_engine.py.

    python tests/parallel/tp_engine_main.py MODEL_DIR --size 2          # rank 0 spawns rank 1
    torchrun --nnodes 2 --nproc-per-node 1 ... tests/parallel/tp_engine_main.py MODEL_DIR --size 2

Rank 0 prints one JSON line: the greedy tokens of PROMPTS (token ids), its pid
and its workers' pids. ``--hold`` prints the pids first and then sleeps (the
orphan test kills it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from llmopt.runtime.llm import LLM
from llmopt.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n: int = 8, vocab: int = 258, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


def engine(model_dir: str, size: int) -> LLM:
    return LLM(model_dir, lower="eager", block_size=16, num_kv_blocks=64, tensor_parallel_size=size)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    llm = engine(args.model_dir, args.size)  # on a torchrun worker rank this serves rank 0, then exits
    pids = {"pid": os.getpid(), "worker_pids": getattr(llm.engine.runner, "worker_pids", []),
            "threads": torch.get_num_threads()}
    if args.hold:
        print(json.dumps(pids), flush=True)
        time.sleep(600)
        return 0
    tokens = [out.token_ids for out in llm.generate(prompts(), GREEDY)]
    print(json.dumps({**pids, "tokens": tokens, "free_blocks": llm.engine.num_free_blocks}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
