"""Soak: N clients against a real ``llmopt serve`` for M minutes, every answer checked.

The server runs as its own process (``llmopt serve``, 127.0.0.1, a free
port). A seeded set of greedy requests (completions and chat, streaming or
not, 8-48 new tokens, EOS ignored) is first run alone, one at a time: those
answers are the references. Then N client threads send requests drawn from
the set, each on its own keep-alive connection, for M minutes, and every
answer is compared with its reference:

  error      an HTTP error status or an error event in a stream;
  lost       no complete answer: the connection failed or timed out, or a
             stream ended without ``data: [DONE]``;
  corrupted  a complete answer whose text differs from the reference.

The server's RSS is sampled every few seconds (plotted over time); growth
is measured from the end of the warm-up (the first ``--warmup`` fraction of
the run) to the mean of the last minute. After the run ``/metrics`` must
show no running or waiting request and no KV block in use. The record (JSON,
with the machine, versions and settings) and the plot go to bench/results/.
Target: 0 lost, 0 corrupted, RSS growth under 5% after warm-up.

    python bench/soak.py [--clients 32] [--minutes 10] [--model smollm2] [--lower eager]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, versions, write_record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"llmopt serve: ready on http://127\.0\.0\.1:(\d+), model (\S+)")

PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
    "The three primary colours are", "Water boils at", "My favourite book is", "In 1969, the first",
    "The quick brown fox", "A haiku about the sea:", "To make a cup of tea, first", "Photosynthesis is",
    "The largest planet in the solar system", "import numpy as np\n", "Dear hiring manager,",
]
QUESTIONS = [
    "What is the capital of Italy?", "Name three fruits.", "How many legs does a spider have?",
    "Write one sentence about autumn.", "What is 12 times 12?", "Say hello in French.",
    "What colour is the sky?", "Give me a word that rhymes with cat.", "Who wrote Hamlet?",
    "What is a prime number?",
]


def workload(seed: int, size: int) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for i in range(size):
        max_tokens = rng.randint(8, 48)
        if i % 2:
            body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": max_tokens}
            path = "/v1/chat/completions"
        else:
            body = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens}
            path = "/v1/completions"
        body.update(temperature=0, ignore_eos=True)
        jobs.append({"path": path, "body": body})
    return jobs


class Outcome:
    OK, ERROR, LOST, CORRUPTED = "ok", "error", "lost", "corrupted"


def ask(connection: http.client.HTTPConnection, job: dict, stream: bool) -> tuple[str, str | None, int, str]:
    """(outcome, text, output tokens, detail) of one request on a keep-alive connection."""
    chat = job["path"].endswith("chat/completions")
    body = dict(job["body"], stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    try:
        connection.request("POST", job["path"], body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
    except Exception as error:  # connection failed, reset, timed out
        connection.close()
        return Outcome.LOST, None, 0, f"{type(error).__name__}: {error}"
    if response.status != 200:
        return Outcome.ERROR, None, 0, f"HTTP {response.status}: {data[:200]!r}"
    if not stream:
        answer = json.loads(data)
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return Outcome.OK, text, answer["usage"]["completion_tokens"], ""
    events = [part[6:] for part in data.decode().split("\n\n") if part.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return Outcome.LOST, None, 0, "the stream ended without [DONE]"
    text, tokens = "", 0
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            return Outcome.ERROR, None, 0, f"error event: {chunk['error']['message']}"
        for choice in chunk.get("choices", []):
            text += (choice["delta"].get("content") or "") if chat else choice["text"]
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return Outcome.OK, text, tokens, ""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def scrape(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "_bucket" not in line and "_created" not in line:
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            values[key] = values.get(key, 0.0) + float(value)
    return values


def start_server(args) -> tuple[subprocess.Popen, int, list[str]]:
    command = [sys.executable, "-m", "llmopt.cli", "serve", "--model", args.model, "--lower", args.lower,
               "--port", "0", "--max-waiting", str(max(256, 4 * args.clients))]
    if args.kv_cache_gib:
        command += ["--kv-cache-gib", str(args.kv_cache_gib)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    for line in process.stdout:
        log.append(line)
        match = READY.search(line)
        if match:
            threading.Thread(target=lambda: [log.append(x) for x in process.stdout], daemon=True).start()
            return process, int(match.group(1)), log
    raise SystemExit("llmopt serve exited before it was ready:\n" + "".join(log[-30:]))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--model", default="smollm2", help="model to serve (default smollm2)")
    parser.add_argument("--lower", choices=("eager", "inductor"), default="eager",
                        help="the server's --lower (default eager: no compile time inside the run)")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="the server's --kv-cache-gib")
    parser.add_argument("--requests", type=int, default=24, help="distinct requests in the workload (default 24)")
    parser.add_argument("--stream-fraction", type=float, default=0.5, help="share of streamed requests")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run that is warm-up (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="record path (default bench/results/soak-<host>-<time>.json)")
    args = parser.parse_args()

    load_start = os.getloadavg()
    process, port, log = start_server(args)
    try:
        return run(args, process, port, log, load_start)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def run(args, process, port, log, load_start) -> int:
    jobs = workload(args.seed, args.requests)
    print(f"soak: server pid {process.pid} on port {port}; computing {len(jobs)} greedy references alone ...",
          flush=True)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    references = []
    for job in jobs:
        outcome, text, _, detail = ask(connection, job, stream=False)
        if outcome != Outcome.OK:
            raise SystemExit(f"reference request failed: {detail}")
        references.append(text)
    connection.close()

    duration = args.minutes * 60
    stop_at = time.monotonic() + duration
    lock = threading.Lock()
    counts = {o: 0 for o in (Outcome.OK, Outcome.ERROR, Outcome.LOST, Outcome.CORRUPTED)}
    details: list[str] = []
    latencies: list[float] = []
    tokens = [0]
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()

    def client(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while time.monotonic() < stop_at:
            k = rng.randrange(len(jobs))
            stream = rng.random() < args.stream_fraction
            start = time.monotonic()
            outcome, text, n, detail = ask(conn, jobs[k], stream)
            if outcome == Outcome.LOST:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            if outcome == Outcome.OK and text != references[k]:
                outcome, detail = Outcome.CORRUPTED, f"request {k} (stream={stream}): {text!r} != {references[k]!r}"
            with lock:
                counts[outcome] += 1
                if outcome == Outcome.OK:
                    latencies.append(time.monotonic() - start)
                    tokens[0] += n
                elif len(details) < 50:
                    details.append(f"{outcome}: {detail}")
        conn.close()

    def sampler() -> None:
        while time.monotonic() < stop_at and process.poll() is None:
            rss.append((time.monotonic() - t0, rss_bytes(process.pid)))
            time.sleep(args.rss_every)
        rss.append((time.monotonic() - t0, rss_bytes(process.pid)))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    rss_thread = threading.Thread(target=sampler, daemon=True)
    rss_thread.start()
    for thread in threads:
        thread.start()
    last_report = time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if time.monotonic() - last_report >= 60:
            last_report = time.monotonic()
            with lock:
                print(f"  {time.monotonic() - t0:6.0f} s: {counts}, RSS {rss[-1][1] / 2**20:.0f} MiB", flush=True)
    wall = time.monotonic() - t0
    rss_thread.join(args.rss_every + 5)

    deadline = time.monotonic() + 30
    after = scrape(port)
    while (after.get("llmopt_num_requests_running", 0) or after.get("llmopt_kv_blocks_used", 0)) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
        after = scrape(port)
    alive = process.poll() is None

    warm_end = duration * args.warmup
    warm = [r for t, r in rss if t >= warm_end]
    baseline = warm[0] if warm else rss[0][1]
    tail = [r for t, r in rss if t >= wall - 60] or [rss[-1][1]]
    growth = (statistics.mean(tail) - baseline) / baseline if baseline else float("nan")
    done = sum(counts.values())
    figures = {
        "wall_s": round(wall, 1),
        "requests": done,
        "ok": counts[Outcome.OK],
        "errors": counts[Outcome.ERROR],
        "lost": counts[Outcome.LOST],
        "corrupted": counts[Outcome.CORRUPTED],
        "requests_per_s": round(counts[Outcome.OK] / wall, 3),
        "output_tokens_per_s": round(tokens[0] / wall, 2),
        "latency_p50_s": round(percentile(latencies, 0.5), 3),
        "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "rss_start_mib": round(rss[0][1] / 2**20, 1),
        "rss_after_warmup_mib": round(baseline / 2**20, 1),
        "rss_end_mib": round(statistics.mean(tail) / 2**20, 1),
        "rss_max_mib": round(max(r for _, r in rss) / 2**20, 1),
        "rss_growth_after_warmup": round(growth, 4),
        "server_alive_at_end": alive,
        "metrics_after": {k: after.get(k) for k in ("llmopt_num_requests_running", "llmopt_num_requests_waiting",
                                                     "llmopt_kv_blocks_used", "llmopt_num_requests_pending",
                                                     "llmopt_prefix_cache_hit_rate", "llmopt_generation_tokens_total")},
    }
    passed = (figures["lost"] == 0 and figures["corrupted"] == 0 and growth < 0.05 and alive
              and not after.get("llmopt_kv_blocks_used") and not after.get("llmopt_num_requests_running"))
    record = {
        "benchmark": "soak",
        "machine": machine(load_start),
        "versions": versions(),
        "settings": {"clients": args.clients, "minutes": args.minutes, "model": args.model, "lower": args.lower,
                     "kv_cache_gib": args.kv_cache_gib, "distinct_requests": len(jobs),
                     "stream_fraction": args.stream_fraction, "max_tokens_range": [8, 48], "greedy": True,
                     "ignore_eos": True, "warmup_fraction": args.warmup, "rss_every_s": args.rss_every,
                     "seed": args.seed},
        "figures": figures,
        "target_met": passed,
        "failure_details": details,
        "rss_samples": [(round(t, 1), r) for t, r in rss],
    }
    path = write_record("soak", record, args.out)
    plot = _plot(rss, warm_end, path.with_suffix(".png"), args)
    if plot:
        record["plot"] = plot.name
        path.write_text(json.dumps(record, indent=2) + "\n")

    print()
    print(f"| clients | minutes | requests | ok | errors | lost | corrupted | req/s | out tok/s | p50 s | p99 s "
          f"| RSS after warm-up MiB | RSS end MiB | growth |")
    print("| --- " * 14 + "|")
    print(f"| {args.clients} | {args.minutes:g} | {done} | {figures['ok']} | {figures['errors']} | {figures['lost']} "
          f"| {figures['corrupted']} | {figures['requests_per_s']} | {figures['output_tokens_per_s']} "
          f"| {figures['latency_p50_s']} | {figures['latency_p99_s']} | {figures['rss_after_warmup_mib']} "
          f"| {figures['rss_end_mib']} | {growth:+.2%} |")
    print(f"\nafter the run: {figures['metrics_after']}; server alive: {alive}")
    for line in details[:10]:
        print("  " + line)
    print(f"record: {path}" + (f", plot: {plot}" if plot else ""))
    print("target met (0 lost, 0 corrupted, RSS growth < 5%, nothing left in the engine):", passed)
    return 0 if passed else 1


def _plot(rss, warm_end: float, path: Path, args) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install 'llmopt[bench]')")
        return None
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.plot([t / 60 for t, _ in rss], [r / 2**20 for _, r in rss], marker=".", linewidth=1)
    axes.axvline(warm_end / 60, color="grey", linestyle="--", label="end of warm-up")
    axes.set_xlabel("minutes")
    axes.set_ylabel("server RSS (MiB)")
    axes.set_title(f"llmopt serve soak: {args.clients} clients, {args.model}, lower={args.lower}")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    sys.exit(main())
