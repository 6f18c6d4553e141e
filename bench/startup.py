"""Start-up: seconds from the command to the first token of ``llmopt generate``, cold and warm.

Each run is a fresh process, timed from its launch to the first byte of the
answer on its stdout (progress lines go to stderr). ``cold`` runs start as a
fresh clone does after set-up: a new ``TORCHINDUCTOR_CACHE_DIR`` (Inductor
compiles from nothing) and a new ``LLMOPT_CACHE_DIR`` holding only the
converted copy of the embedded GGUF that ``scripts/setup.sh`` makes
(``--cold-from gguf``: not even that, the command converts the GGUF);
``warm`` runs reuse the caches the cold run left: the second run of a
user's session. Settings:

  llmopt         ``llmopt generate`` as a user types it (quick start: an uncompiled worker answers
                 while the engine compiles, then the engine takes over)
  llmopt-wait    ``llmopt generate --wait-for-compile`` (the serving engine only)
  llmopt-eager   ``llmopt generate --lower eager``
  no-compile     ``llmopt generate --no-compile`` (the plain Hugging Face cache loop)
  llama.cpp      the peer: a Python process that imports llama_cpp, loads the Q4_1 GGUF
                 and streams the first token of the same chat prompt (skipped when
                 llama_cpp is not installed)

    python bench/startup.py [--settings llmopt llmopt-eager] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, versions, write_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("llmopt", "llmopt-wait", "llmopt-eager", "no-compile", "llama.cpp")
PROMPT = "What is the capital of France?"
LLMOPT = [sys.executable, "-m", "llmopt"]
_LLAMA_CPP = """
import sys
from llama_cpp import Llama
from llmopt.models.smollm2 import gguf_path
llm = Llama(model_path=str(gguf_path()), n_ctx=512, n_threads={threads}, verbose=False)
stream = llm.create_chat_completion([{{"role": "user", "content": {prompt!r}}}], max_tokens={max_tokens},
                                    temperature=0.0, stream=True)
for chunk in stream:
    text = chunk["choices"][0]["delta"].get("content")
    if text:
        sys.stdout.write(text); sys.stdout.flush()
"""


def command(setting: str, max_tokens: int, threads: int) -> list[str]:
    generate = LLMOPT + ["generate", PROMPT, "--max-tokens", str(max_tokens)]
    if setting == "llmopt":
        return generate
    if setting == "llmopt-wait":
        return generate + ["--wait-for-compile"]
    if setting == "llmopt-eager":
        return generate + ["--lower", "eager", "--wait-for-compile"]
    if setting == "no-compile":
        return generate + ["--no-compile"]
    if setting == "llama.cpp":
        return [sys.executable, "-c", _LLAMA_CPP.format(threads=threads, prompt=PROMPT, max_tokens=max_tokens)]
    raise ValueError(setting)


def copy_converted_model(cache_dir: Path) -> None:
    """Put the converted copy of the embedded GGUF (what set-up makes) under ``cache_dir``."""
    import shutil

    from llmopt.models import converted_cache, gguf_path, load

    entry = converted_cache.entry_path(gguf_path())
    if not converted_cache.is_complete(entry):
        load("smollm2")  # makes it, as scripts/setup.sh does
    shutil.copytree(entry, converted_cache.entry_path(gguf_path(), root=cache_dir / "converted"))


def time_to_first_token(cmd: list[str], env: dict, timeout: float) -> dict:
    """Launch ``cmd``; seconds to its first stdout byte and to its exit, and what it printed."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    first, out, err = None, b"", b""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    selector.register(process.stderr, selectors.EVENT_READ)
    open_streams = 2
    while open_streams:
        if time.perf_counter() - start > timeout:
            process.kill()
            raise TimeoutError(f"{cmd} ran past {timeout} s")
        for key, _ in selector.select(timeout=1.0):
            data = os.read(key.fileobj.fileno(), 65536)
            if not data:
                selector.unregister(key.fileobj)
                open_streams -= 1
            elif key.fileobj is process.stdout:
                if first is None and data.strip():
                    first = time.perf_counter() - start
                out += data
            else:
                err += data
    code = process.wait()
    total = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{cmd} exited {code}: {err.decode(errors='replace')[-2000:]}")
    return {"first_token_s": first, "total_s": total, "answer": out.decode(errors="replace").strip()[:200],
            "progress": [line for line in err.decode(errors="replace").splitlines()
                         if line.startswith("llmopt:") or line.startswith("[")]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per setting (median); one cold run")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--cold-from", choices=("setup", "gguf"), default="setup",
                        help="cold runs start after set-up (the converted copy exists; default) or from the GGUF")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    rows = []
    for setting in args.settings:
        if setting == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError as error:
                rows.append({"setting": setting, "skipped": f"llama_cpp not installed: {error}"})
                continue
        with tempfile.TemporaryDirectory(prefix="llmopt-startup-") as caches:
            env = dict(os.environ, LLMOPT_CACHE_DIR=f"{caches}/llmopt", TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor",
                       OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
            if args.cold_from == "setup":
                copy_converted_model(Path(caches) / "llmopt")
            cmd = command(setting, args.max_tokens, args.threads)
            cold = time_to_first_token(cmd, env, args.timeout)
            warm = [time_to_first_token(cmd, env, args.timeout) for _ in range(args.repeats)]
        row = {"setting": setting, "command": cmd[2:] if cmd[:2] == LLMOPT[:2] else ["python", "-c", "..."],
               "cold_first_token_s": cold["first_token_s"], "cold_total_s": cold["total_s"],
               "warm_first_token_s": statistics.median(r["first_token_s"] for r in warm),
               "warm_runs": warm, "cold_run": cold}
        rows.append(row)
        print(f"{setting:>13}: cold {row['cold_first_token_s']:.1f} s, warm {row['warm_first_token_s']:.1f} s "
              f"to the first token", flush=True)
    record = {"benchmark": "startup", "machine": machine(load_start), "versions": versions(),
              "settings": {"prompt": PROMPT, "max_tokens": args.max_tokens, "threads": args.threads,
                           "repeats": args.repeats, "cold_from": args.cold_from}, "results": rows}
    out = write_record("startup", record, args.out)
    print()
    print("| setting | cold: first token (s) | warm: first token (s, median) |")
    print("| --- | --- | --- |")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['setting']} | skipped: {row['skipped']} | |")
        else:
            print(f"| {row['setting']} | {row['cold_first_token_s']:.1f} | {row['warm_first_token_s']:.1f} |")
    print(f"\nrecord: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
