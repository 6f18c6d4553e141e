"""Cascade inference on SmolLM2-135M: int4 as the small model, fp32 as the large one (CPU).

Workload: the chat prompts of bench/speculative.py (questions answered from
the model's own knowledge), greedy, --max-tokens new tokens each (end of
sequence ignored, so every setting emits the same number), one request at a
time.

Settings, on one compiled token cascade (two compiled runners; the rule is
swapped between settings, the models stay compiled: on this shared 2-core
machine every compile costs minutes):
  plain-int4 / plain-fp32   each model alone: plain greedy decode through the
                            cascade's own compiled runner of that model, one
                            token per forward (no scheduler: a hair faster than
                            the engine's plain decode)
  token-t{T}-k{K}           token level: int4 drafts --draft-tokens per round, fp32
                            scores them; keep while p_int4 >= T or in fp32's top-K
  response-t{T}             response level, composed from the two plain runs: the
                            response cascade runs exactly those greedy generations
                            (int4's answer; fp32's when int4's mean max-prob is
                            below T), so its output, confidence and cost (int4's
                            time, plus fp32's where it escalates) follow from them

Cost per setting: output tokens/s (wall time of the whole request, prefill
included), FLOPs per output token (both models, counted from the shapes:
llmopt/runtime/cascade_cost.py), fp32 forwards per output token. Quality:
agreement with the largest model, teacher-forced (each output token against
fp32's greedy choice at the same prefix, one eager Hugging Face forward over
prompt + output), and the share of each output identical to plain fp32's
(common prefix / length).

    flock /tmp/bench.lock .venv/bin/python bench/cascade.py [--max-tokens 64] [--prompts 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pyplot, versions, write_record  # noqa: E402
from speculative import CHAT, chat_ids  # noqa: E402


def run(engine, prompts, params) -> tuple[list[list[int]], float, list]:
    """Each prompt alone through ``engine`` (step API): token ids, wall seconds, outputs."""
    tokens, outputs, wall = [], [], 0.0
    for prompt in prompts:
        start = time.perf_counter()
        request_id = engine.add_request(None, prompt, params)
        final = None
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == request_id and out.finished:
                    final = out
        wall += time.perf_counter() - start
        tokens.append(list(final.token_ids))
        outputs.append(final)
    return tokens, wall, outputs


def plain_decode(engine, runner, prompt, max_tokens) -> tuple[list[int], float, list[float]]:
    """Greedy decode through one of the cascade's compiled runners, one token per forward, in the
    KV slot of request 0 (the cascade is idle): token ids, wall seconds, each token's max-prob."""
    bs = engine.config.block_size
    table = list(range(engine.blocks_per_slot))
    start = time.perf_counter()
    logits = runner.execute_packed([(list(prompt), 0, table)], bs)
    tokens, max_probs = [], []
    while True:
        probs = logits[0].softmax(-1)
        token = int(logits[0].argmax())
        tokens.append(token)
        max_probs.append(float(probs[token]))
        if len(tokens) == max_tokens:
            break
        logits = runner.execute_packed([([token], len(prompt) + len(tokens) - 1, table)], bs)
    return tokens, time.perf_counter() - start, max_probs


@torch.no_grad()
def teacher_forced_agreement(model, prompts, outputs) -> float:
    """Fraction of output tokens equal to ``model``'s argmax given the same prefix."""
    same = total = 0
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt + out])
        choice = model(ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        same += sum(int(a == b) for a, b in zip(choice, out))
        total += len(out)
    return same / total


def prefix_share(outputs, reference) -> float:
    shares = []
    for out, ref in zip(outputs, reference):
        n = 0
        while n < min(len(out), len(ref)) and out[n] == ref[n]:
            n += 1
        shares.append(n / max(len(ref), 1))
    return sum(shares) / len(shares)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3, help="chat prompts (of 3)")
    parser.add_argument("--draft-tokens", type=int, default=4, help="small-model tokens per round (token level)")
    parser.add_argument("--token-thresholds", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.9, 1.01])
    parser.add_argument("--token-top-k", type=int, nargs="+", default=[0, 1],
                        help="top-k values, each swept over the thresholds (top-1 at threshold > 1 is "
                             "lossless speculative decoding)")
    parser.add_argument("--response-thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--lower", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # ModelRunner._forward is one code object for both compiled runners of this run.
    torch._dynamo.config.recompile_limit = 64
    load_start = os.getloadavg()

    from llmopt.models import load
    from llmopt.runtime.cascade import Cascade
    from llmopt.runtime.cascade_cost import ModelShape
    from llmopt.runtime.cascade_rules import TokenRule
    from llmopt.runtime.llm import LLM
    from llmopt.runtime.sampling_params import SamplingParams

    small = {"model": "smollm2", "compile_options": {"quantize": "int4"}, "name": "smollm2-int4"}
    large = {"model": "smollm2", "name": "smollm2-fp32"}
    options = dict(lower=args.lower, kv_cache_memory_gib=1.0, max_model_len=1024, max_num_seqs=2)
    compile_start = time.perf_counter()
    token_llm = LLM(Cascade([small, large], deferral="token", threshold=0.0,
                            num_draft_tokens=args.draft_tokens), **options)
    compile_s = time.perf_counter() - compile_start
    token_engine = token_llm.engine
    tok = token_llm.tokenizer
    prompts = [chat_ids(tok, t) for t in CHAT[:args.prompts]]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    reference_model = load("smollm2").model.eval()  # eager fp32 Hugging Face: the agreement oracle
    shape = ModelShape.of(reference_model)

    rows: list[dict] = []
    record = dict(benchmark="cascade", machine=machine(load_start), versions=versions(),
                  settings=dict(max_tokens=args.max_tokens, prompts=args.prompts, draft_tokens=args.draft_tokens,
                                token_thresholds=args.token_thresholds, token_top_k=args.token_top_k,
                                response_thresholds=args.response_thresholds, threads=args.threads,
                                lower=args.lower, small=small, large=large, compile_s=compile_s),
                  notes="Batch 1, greedy, end of sequence ignored. plain rows: greedy decode through the "
                        "cascade's own compiled runner of each model, one token per forward; response rows: "
                        "composed from the two plain runs (the response cascade's generations are exactly "
                        "those). tokens_per_s: output tokens over the wall time of the requests (prefill "
                        "included). gflop_per_token: both models' forwards, "
                        "counted from the shapes (int4 counted dense). large_forwards_per_token: fp32 "
                        "forward passes per output token. agreement: output tokens equal to fp32's greedy "
                        "choice at their prefix (teacher-forced, eager HF fp32). prefix_share: mean common "
                        "prefix with plain fp32's output / its length. Other agents' jobs shared this "
                        "2-core machine: see the load averages. The record is rewritten after every row.",
                  rows=rows)
    path = write_record("cascade", record, args.out)

    # Warm the decode shapes of both compiled runners (compiles happen here, not in the timings).
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    run(token_engine, prompts[:1], warm)
    for runner in token_engine.runners:
        plain_decode(token_engine, runner, prompts[0], 8)

    def add(setting, deferral, tokens, wall, flops, large_forwards, small_share, threshold=None, top_k=None):
        emitted = sum(len(t) for t in tokens)
        rows.append(dict(setting=setting, deferral=deferral, threshold=threshold, top_k=top_k,
                         tokens_per_s=emitted / wall, wall_s=wall, tokens=emitted,
                         gflop_per_token=flops / emitted / 1e9, large_forwards_per_token=large_forwards / emitted,
                         small_share=small_share, agreement=teacher_forced_agreement(reference_model, prompts, tokens),
                         prefix_share=prefix_share(tokens, reference),
                         identical=sum(int(a == b) for a, b in zip(tokens, reference))))
        r = rows[-1]
        base = rows[1]["tokens_per_s"] if len(rows) > 1 else r["tokens_per_s"]
        r["speedup_vs_fp32"] = r["tokens_per_s"] / base
        print(f"{setting:22s} {r['tokens_per_s']:7.1f} tok/s  x{r['speedup_vs_fp32']:.2f}  "
              f"{r['gflop_per_token']:.3f} GFLOP/tok  fp32 fwd/tok {r['large_forwards_per_token']:.2f}  "
              f"small {small_share:.2f}  agree {r['agreement']:.3f}  prefix {r['prefix_share']:.2f}  "
              f"identical {r['identical']}/{len(tokens)}", flush=True)
        record["machine"] = machine(load_start)
        write_record("cascade", record, str(path))

    def plain_flops(tokens, which=None):
        return sum(shape.forward_flops(0, len(p) + len(t) - 1, len(t)) for p, t in zip(which or prompts, tokens))

    int4_runs = [plain_decode(token_engine, token_engine.small, p, args.max_tokens) for p in prompts]
    fp32_runs = [plain_decode(token_engine, token_engine.large, p, args.max_tokens) for p in prompts]
    int4_tokens, int4_wall = [r[0] for r in int4_runs], sum(r[1] for r in int4_runs)
    reference, fp32_wall = [r[0] for r in fp32_runs], sum(r[1] for r in fp32_runs)
    add("plain-int4", None, int4_tokens, int4_wall, plain_flops(int4_tokens), 0, 1.0)
    # plain-fp32 is rows[1], the speed reference
    add("plain-fp32", None, reference, fp32_wall, plain_flops(reference), sum(len(t) for t in reference), 0.0)
    rows[0]["speedup_vs_fp32"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    record["models"] = [
        dict(name=name, decode_ms_per_token=1e3 * wall / sum(len(t) for t in tokens),
             gflop_per_token_at_mean_context=shape.flops_per_token(
                 int(sum(len(p) + len(t) / 2 for p, t in zip(prompts, tokens)) / len(prompts))) / 1e9,
             decoder_linear_params=shape.decoder_linear_params, head_params=shape.head_params)
        for name, tokens, wall in (("smollm2-int4", int4_tokens, int4_wall), ("smollm2-fp32", reference, fp32_wall))]

    for top_k in args.token_top_k:
        for threshold in args.token_thresholds:
            token_engine.set_rule(TokenRule(threshold, top_k, args.draft_tokens))
            before = token_engine.stats.to_dict()
            tokens, wall, _ = run(token_engine, prompts, params)
            after = token_engine.stats.to_dict()
            judged = after.get("judged", 0) - before.get("judged", 0)
            kept = after.get("kept", 0) - before.get("kept", 0)
            add(f"token-t{threshold:g}-k{top_k}", "token", tokens, wall, after["flops"] - before["flops"],
                after["models"][1]["forwards"] - before["models"][1]["forwards"],
                kept / judged if judged else 0.0, threshold, top_k)

    for threshold in args.response_thresholds:
        # The response cascade's generations are the plain ones above: int4's answer, kept when its
        # mean max-prob reaches the threshold, else fp32's answer to the same prompt.
        confidences = [sum(r[2]) / len(r[2]) for r in int4_runs]
        escalated = [c < threshold for c in confidences]
        tokens = [f[0] if e else i[0] for i, f, e in zip(int4_runs, fp32_runs, escalated)]
        wall = sum(i[1] + (f[1] if e else 0.0) for i, f, e in zip(int4_runs, fp32_runs, escalated))
        flops = sum(plain_flops([i[0]], [p]) + (plain_flops([f[0]], [p]) if e else 0)
                    for p, i, f, e in zip(prompts, int4_runs, fp32_runs, escalated))
        add(f"response-t{threshold:g}", "response", tokens, wall, flops,
            sum(len(f[0]) for f, e in zip(fp32_runs, escalated) if e), 1 - sum(escalated) / len(escalated),
            threshold)
        rows[-1]["confidences"] = confidences

    record["machine"] = machine(load_start)
    write_record("cascade", record, str(path))
    print(table(record))
    picture = plot(rows, path.with_suffix(".png"))
    print(f"\nrecord: {path}" + (f"\nplot: {picture}" if picture else ""))
    return 0


def table(record) -> str:
    lines = [f"{'setting':22s}{'tok/s':>8}{'x fp32':>8}{'GFLOP/tok':>11}{'fp32 fwd/tok':>13}{'small':>7}"
             f"{'agree':>7}{'prefix':>8}{'ident':>7}"]
    for r in record["rows"]:
        lines.append(f"{r['setting']:22s}{r['tokens_per_s']:8.1f}{r['speedup_vs_fp32']:8.2f}"
                     f"{r['gflop_per_token']:11.3f}{r['large_forwards_per_token']:13.2f}{r['small_share']:7.2f}"
                     f"{r['agreement']:7.3f}{r['prefix_share']:8.2f}{r['identical']:>5}/{record['settings']['prompts']}")
    return "\n".join(lines)


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in rows:
        key = r["setting"] if r["deferral"] is None else (
            f"token, top-{r['top_k']}" if r["deferral"] == "token" else "response")
        series.setdefault(key, []).append(r)
    for key, group in series.items():
        xs = [r["agreement"] for r in group]
        ys = [r["speedup_vs_fp32"] for r in group]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(group) > 1 else "", label=key)
        for r in group:
            if r["threshold"] is not None:
                ax.annotate(f"{r['threshold']:g}", (r["agreement"], r["speedup_vs_fp32"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("agreement with SmolLM2 fp32 greedy (teacher-forced)")
    ax.set_ylabel("output tokens/s against plain fp32")
    ax.set_title("Cascade SmolLM2 int4 -> fp32, chat workload, batch 1 (labels: threshold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    sys.exit(main())
