"""Start ``llmopt serve``, query it with the ``openai`` client (streaming and not), stop it.

    python examples/serve_openai.py [--prompt "..."] [--question "..."] [--max-tokens 32] [--lower eager]
    python examples/serve_openai.py --tiny   # a small random Llama with a byte-level tokenizer

The server runs as a subprocess on 127.0.0.1, on a free port, exactly as a
user would start it (``python -m llmopt.cli serve --model ... --port N``).
Once ``/health`` answers, the script asks for the same greedy completion
(``temperature=0``) four ways: ``/v1/completions`` (``--prompt``) and
``/v1/chat/completions`` (``--question``), each without and with ``stream=True`` (SSE), and
prints the replies. Exits 1 unless each streamed reply, its chunks joined,
equals the non-streamed one, then shuts the server down.

``--tiny`` saves a random 2-layer Llama and a byte-level tokenizer (with a
small chat template) to a temporary folder and serves that (``--model DIR``):
its text is noise, but the server, engine and protocol are the real ones.

Needs the server's extra and the client: ``pip install 'llmopt[serve]' openai``.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    args = _parse_args(argv)
    scratch = tempfile.TemporaryDirectory()
    model = _save_tiny_model(Path(scratch.name)) if args.tiny else args.model
    port = _free_port()
    command = [sys.executable, "-m", "llmopt.cli", "serve", "--model", model, "--served-model-name", args.name,
               "--host", "127.0.0.1", "--port", str(port), "--lower", args.lower, "--kv-cache-gib", "0.25"]
    print("starting:", " ".join(command[1:]), flush=True)
    server = subprocess.Popen(command, cwd=REPO)
    try:
        _wait_until_ready(server, port, args.startup_timeout)
        return _query(port, args)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        scratch.cleanup()
        print(f"server stopped (exit status {server.returncode})")


def _query(port: int, args) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    [served] = [m.id for m in client.models.list().data]
    greedy = dict(model=served, max_tokens=args.max_tokens, temperature=0)
    ok = True

    text = client.completions.create(prompt=args.prompt, **greedy).choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in
                       client.completions.create(prompt=args.prompt, stream=True, **greedy))
    ok &= _report("completions", text, streamed)

    messages = [{"role": "user", "content": args.question}]
    reply = client.chat.completions.create(messages=messages, **greedy).choices[0].message.content
    chunks = client.chat.completions.create(messages=messages, stream=True, **greedy)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    ok &= _report("chat", reply, streamed)

    print(f"check: streamed replies equal the non-streamed ones (greedy, model {served}): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _report(endpoint: str, text: str, streamed: str) -> bool:
    print(f"{endpoint}: {text!r}")
    if streamed != text:
        print(f"{endpoint}, streamed, DIFFERENT: {streamed!r}")
    return streamed == text


def _wait_until_ready(server: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"llmopt serve exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"llmopt serve was not ready after {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _save_tiny_model(folder: Path) -> str:
    """A random Llama and a byte-level tokenizer (256 bytes + an end token), saved as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmopt.models import random_llama

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(byte_level.alphabet()))}, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = byte_level, decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end|>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(folder)
    random_llama("gqa", vocab_size=len(tokenizer)).save_pretrained(folder)
    return str(folder)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="serve a small random Llama instead of SmolLM2 (for CI)")
    parser.add_argument("--model", default="smollm2", help="what `llmopt serve --model` gets (default smollm2)")
    parser.add_argument("--name", default="llmopt-example", help="the served model name")
    parser.add_argument("--prompt", default="The capital of France is", help="text the completion continues")
    parser.add_argument("--question", default="What is the capital of France?", help="the chat's user message")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--lower", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for /health")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
