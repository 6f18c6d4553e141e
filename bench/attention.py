#!/usr/bin/env python
"""Flash-attention benchmark: llmopt's Triton kernels vs torch SDPA, on one CUDA GPU.

Measures forward and forward+backward throughput (TFLOP/s) of
``llmopt.kernels.triton_flash`` and of ``torch.nn.functional.scaled_dot_product_attention``
in the same run, after checking that both agree (max abs difference of the output and
of dq/dk/dv). Shapes: bf16, causal and non-causal, head dim 64 and 128, sequence
lengths 1k..16k with the batch chosen so that ``B * L`` is constant (32k tokens by
default, 16 heads), plus GQA shapes (Hq=32, Hkv=8, D=128; SDPA runs with
``enable_gqa=True``).

FLOP model (the usual FlashAttention convention): forward = 4 * B * Hq * Lq * Lk * D
(two matmuls), halved for causal; backward = 2.5 x forward; forward+backward = 3.5 x.

Writes a JSON record to ``bench/results/attention-<gpu>-<date>.json``.

Usage::

    python bench/attention.py            # full sweep
    python bench/attention.py --quick    # a few shapes
    python bench/attention.py --peak 790 --sdpa-backend flash
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import socket
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name; first substring match wins.
PEAK_BF16_TFLOPS = [
    ("GH200", 989.4),
    ("H200", 989.4),  # same SXM5 compute as H100 SXM; ~790 measured achievable for dense GEMM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 6000 Ada", 364.0),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset of shapes (L=1k,4k; D=128; one GQA shape)")
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="sequence lengths (default 1k..16k)")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="head dims for the MHA shapes (64 128)")
    p.add_argument("--tokens", type=int, default=32768, help="B * L per shape (default 32768)")
    p.add_argument("--heads", type=int, default=16, help="heads of the MHA shapes (default 16)")
    p.add_argument("--gqa", type=str, default="32,8,128", help="Hq,Hkv,D of the GQA shapes; 'none' to skip")
    p.add_argument("--causal", choices=["both", "causal", "noncausal"], default="both")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against SDPA")
    p.add_argument("--peak", type=float, default=None, help="bf16 dense peak TFLOP/s (default: by GPU name)")
    p.add_argument("--sdpa-backend", choices=["default", "flash", "cudnn", "efficient"], default="default",
                   help="restrict SDPA to one backend (default: PyTorch's own choice)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--out", type=str, default=None, help="JSON output path (default bench/results/...)")
    return p.parse_args(argv)


def gpu_peak(name: str):
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def make_cases(args):
    if args.quick:
        seqlens = args.seqlens or [1024, 4096]
        head_dims = args.head_dims or [128]
    else:
        seqlens = args.seqlens or [1024, 2048, 4096, 8192, 16384]
        head_dims = args.head_dims or [64, 128]
    causals = {"both": [False, True], "causal": [True], "noncausal": [False]}[args.causal]
    cases = []
    for d in head_dims:
        for seqlen in seqlens:
            for causal in causals:
                cases.append(dict(kind="mha", B=max(1, args.tokens // seqlen), Hq=args.heads, Hkv=args.heads,
                                  L=seqlen, D=d, causal=causal))
    if args.gqa.lower() != "none":
        hq, hkv, d = (int(x) for x in args.gqa.split(","))
        gqa_lens = seqlens if not args.quick else seqlens[-1:]
        for seqlen in gqa_lens:
            for causal in causals:
                cases.append(dict(kind="gqa", B=max(1, args.tokens // seqlen), Hq=hq, Hkv=hkv, L=seqlen, D=d,
                                  causal=causal))
    return cases


def fwd_flops(c):
    f = 4.0 * c["B"] * c["Hq"] * c["L"] * c["L"] * c["D"]
    return f / 2 if c["causal"] else f


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench/attention.py: PyTorch is not installed.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench/attention.py: TRITON_INTERPRET=1 is set; unset it to benchmark on the GPU.", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench/attention.py: no CUDA GPU available (torch.cuda.is_available() is False); "
              "this benchmark only runs on a GPU.", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO_ROOT))
    from llmopt.kernels import triton_flash as tf

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    gpu_name = torch.cuda.get_device_name(dev)
    peak = args.peak if args.peak is not None else gpu_peak(gpu_name)
    dtype = torch.bfloat16

    if args.sdpa_backend == "default":
        import contextlib
        sdpa_ctx = contextlib.nullcontext
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.sdpa_backend]
        sdpa_ctx = lambda: sdpa_kernel(backend)  # noqa: E731

    def sdpa(q, k, v, causal, gqa):
        kwargs = {"enable_gqa": True} if gqa else {}
        with sdpa_ctx():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)

    def bench(fn, grads=None):
        return do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grads, return_mode="median")

    machine = {
        "gpu": gpu_name,
        "gpu_sm_count": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    settings = {
        "dtype": "bfloat16",
        "quick": args.quick,
        "tokens_per_shape": args.tokens,
        "peak_bf16_tflops": peak,
        "peak_source": "--peak" if args.peak is not None else ("table" if peak else "unknown"),
        "sdpa_backend": args.sdpa_backend,
        "do_bench": {"warmup_ms": args.warmup, "rep_ms": args.rep, "return_mode": "median"},
        "flop_model": "fwd = 4*B*Hq*L*L*D (/2 causal); bwd = 2.5*fwd; fwd+bwd = 3.5*fwd",
        "backward": not args.no_backward,
    }
    print(f"GPU: {gpu_name} | torch {torch.__version__} | triton {triton.__version__} | CUDA {torch.version.cuda}")
    print(f"bf16 dense peak: {peak if peak else 'unknown (pass --peak)'} TFLOP/s | SDPA backend: {args.sdpa_backend}")
    print("(first calls of each shape autotune the Triton kernels; that time is not measured)\n")

    cases = make_cases(args)
    results = []
    failures = 0
    torch.manual_seed(0)
    for case in cases:
        b, hq, hkv, seqlen, d, causal = (case[x] for x in ("B", "Hq", "Hkv", "L", "D", "causal"))
        label = f"{case['kind']} B={b} H={hq}/{hkv} L={seqlen} D={d} {'causal' if causal else 'full'}"
        rec = dict(case)
        rec["fwd_gflop"] = fwd_flops(case) / 1e9
        try:
            q = torch.randn(b, hq, seqlen, d, device=dev, dtype=dtype)
            k = torch.randn(b, hkv, seqlen, d, device=dev, dtype=dtype)
            v = torch.randn(b, hkv, seqlen, d, device=dev, dtype=dtype)
            do = torch.randn(b, hq, seqlen, d, device=dev, dtype=dtype)
            c_off = 0 if causal else None
            gqa = hq != hkv

            # ---- correctness vs SDPA (also triggers autotuning)
            out, lse = tf.flash_attention_forward(q, k, v, causal_offset=c_off)
            if not args.no_check:
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                ref = sdpa(qg, kg, vg, causal, gqa)
                check = {"out_max_abs_diff": (out.float() - ref.float()).abs().max().item(),
                         "out_max_abs_ref": ref.float().abs().max().item()}
                ok = check["out_max_abs_diff"] <= 2e-2 * max(1.0, check["out_max_abs_ref"])
                if not args.no_backward:
                    ref.backward(do)
                    dq, dk, dv = tf.flash_attention_backward(do, q, k, v, out, lse, causal_offset=c_off)
                    for name, got, want in (("dq", dq, qg.grad), ("dk", dk, kg.grad), ("dv", dv, vg.grad)):
                        diff = (got.float() - want.float()).abs().max().item()
                        scale = want.float().abs().max().item()
                        check[f"{name}_max_abs_diff"] = diff
                        check[f"{name}_max_abs_ref"] = scale
                        ok = ok and diff <= 5e-2 * max(1.0, scale)
                    del dq, dk, dv
                check["ok"] = bool(ok)
                rec["check"] = check
                failures += 0 if ok else 1
                del qg, kg, vg, ref
            elif not args.no_backward:
                tf.flash_attention_backward(do, q, k, v, out, lse, causal_offset=c_off)
            del out, lse

            # ---- forward
            ms_ours = bench(lambda: tf.flash_attention_forward(q, k, v, causal_offset=c_off))
            ms_sdpa = bench(lambda: sdpa(q, k, v, causal, gqa))
            flops = fwd_flops(case)
            rec["fwd"] = {"ours_ms": ms_ours, "sdpa_ms": ms_sdpa,
                          "ours_tflops": flops / ms_ours / 1e9, "sdpa_tflops": flops / ms_sdpa / 1e9}

            # ---- forward + backward
            if not args.no_backward:
                def ours_fb():
                    o, l = tf.flash_attention_forward(q, k, v, causal_offset=c_off)
                    tf.flash_attention_backward(do, q, k, v, o, l, causal_offset=c_off)

                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

                def sdpa_fb():
                    sdpa(qg, kg, vg, causal, gqa).backward(do)

                ms_ours_fb = bench(ours_fb)
                ms_sdpa_fb = bench(sdpa_fb, grads=[qg, kg, vg])
                flops_fb = 3.5 * flops
                rec["fwd_bwd"] = {"ours_ms": ms_ours_fb, "sdpa_ms": ms_sdpa_fb,
                                  "ours_tflops": flops_fb / ms_ours_fb / 1e9,
                                  "sdpa_tflops": flops_fb / ms_sdpa_fb / 1e9}
                del qg, kg, vg
            q = k = v = do = None  # free the inputs before the next case (the lambdas above close over them)
        except Exception as exc:  # keep going: one bad shape (e.g. OOM) should not kill the sweep
            rec["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            failures += 1
        torch.cuda.empty_cache()
        results.append(rec)
        print(format_row(label, rec, peak), flush=True)

    print()
    print_table(results, peak)
    summary = summarize(results)
    for k_, v_ in summary.items():
        print(f"{k_}: {v_}")

    out_path = Path(args.out) if args.out else default_out_path(gpu_name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "attention",
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "results": results,
        "summary": summary,
    }
    out_path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out_path}")
    if failures:
        print(f"{failures} shape(s) failed the correctness check or errored", file=sys.stderr)
        return 1
    return 0


def default_out_path(gpu_name: str) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in gpu_name.replace("NVIDIA ", "")).strip("-").lower()
    while "--" in slug:
        slug = slug.replace("--", "-")
    date = _dt.date.today().isoformat()
    path = REPO_ROOT / "bench" / "results" / f"attention-{slug}-{date}.json"
    if path.exists():
        path = path.with_name(f"attention-{slug}-{date}-{_dt.datetime.now().strftime('%H%M%S')}.json")
    return path


def _pct(x, peak):
    return f"{100 * x / peak:5.1f}%" if peak else "   n/a"


def format_row(label, rec, peak):
    """One progress line per shape (TFLOP/s: ours vs SDPA)."""
    if "error" in rec:
        return f"{label:<48} ERROR {rec['error'][:80]}"
    parts = [f"{label:<48}"]
    f = rec["fwd"]
    parts.append(f"fwd {f['ours_tflops']:6.1f} vs {f['sdpa_tflops']:6.1f} "
                 f"({f['ours_tflops'] / f['sdpa_tflops']:4.2f}x)")
    if "fwd_bwd" in rec:
        fb = rec["fwd_bwd"]
        parts.append(f"fwd+bwd {fb['ours_tflops']:6.1f} vs {fb['sdpa_tflops']:6.1f} "
                     f"({fb['ours_tflops'] / fb['sdpa_tflops']:4.2f}x)")
    if "check" in rec:
        parts.append("check ok" if rec["check"]["ok"] else "CHECK FAILED")
    return " | ".join(parts)


def print_table(results, peak):
    hdr = (f"{'shape':<48} {'fwd ours':>9} {'fwd sdpa':>9} {'ratio':>6} {'%peak':>7}"
           f" {'f+b ours':>9} {'f+b sdpa':>9} {'ratio':>6} {'%peak':>7} {'max|diff| out/dq':>18}")
    print("TFLOP/s (bf16)")
    print(hdr)
    print("-" * len(hdr))
    for rec in results:
        label = (f"{rec['kind']} B={rec['B']} H={rec['Hq']}/{rec['Hkv']} L={rec['L']} D={rec['D']} "
                 f"{'causal' if rec['causal'] else 'full'}")
        if "error" in rec:
            print(f"{label:<48} ERROR: {rec['error'][:100]}")
            continue
        f = rec["fwd"]
        row = (f"{label:<48} {f['ours_tflops']:9.1f} {f['sdpa_tflops']:9.1f} "
               f"{f['ours_tflops'] / f['sdpa_tflops']:6.2f} {_pct(f['ours_tflops'], peak):>7}")
        if "fwd_bwd" in rec:
            fb = rec["fwd_bwd"]
            row += (f" {fb['ours_tflops']:9.1f} {fb['sdpa_tflops']:9.1f} "
                    f"{fb['ours_tflops'] / fb['sdpa_tflops']:6.2f} {_pct(fb['ours_tflops'], peak):>7}")
        else:
            row += " " * 34
        if "check" in rec:
            ch = rec["check"]
            dq = ch.get("dq_max_abs_diff")
            row += f" {ch['out_max_abs_diff']:8.2e}/{dq:8.2e}" if dq is not None else f" {ch['out_max_abs_diff']:8.2e}"
            if not ch["ok"]:
                row += " FAIL"
        print(row)


def summarize(results):
    def geo(xs):
        xs = [x for x in xs if x > 0]
        return round(math.exp(sum(math.log(x) for x in xs) / len(xs)), 3) if xs else None

    ok = [r for r in results if "error" not in r]
    summary = {
        "fwd_speedup_vs_sdpa_geomean": geo([r["fwd"]["ours_tflops"] / r["fwd"]["sdpa_tflops"] for r in ok]),
        "fwd_ours_tflops_max": round(max((r["fwd"]["ours_tflops"] for r in ok), default=0.0), 1),
    }
    fb = [r for r in ok if "fwd_bwd" in r]
    if fb:
        summary["fwd_bwd_speedup_vs_sdpa_geomean"] = geo(
            [r["fwd_bwd"]["ours_tflops"] / r["fwd_bwd"]["sdpa_tflops"] for r in fb])
        summary["fwd_bwd_ours_tflops_max"] = round(max(r["fwd_bwd"]["ours_tflops"] for r in fb), 1)
    summary["checks_failed"] = sum(1 for r in ok if "check" in r and not r["check"]["ok"])
    summary["errors"] = len(results) - len(ok)
    return summary


if __name__ == "__main__":
    sys.exit(main())
