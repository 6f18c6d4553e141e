"""The ``llmopt`` command line: ``llmopt generate "prompt"`` and ``llmopt explain``.

Heavy imports (torch, transformers) happen inside the commands so that
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_MODEL = "smollm2"
EXPLAIN_PROMPT = "What is the capital of France?"


class UsageError(Exception):
    """A problem the user can fix; reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage dump.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except UsageError as error:
        print(f"llmopt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    from llmopt import __version__

    parser = _Parser(prog="llmopt", description="Compile and run LLMs with the llmopt torch.compile backend.")
    parser.add_argument("--version", action="version", version=f"llmopt {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text for a prompt", description=(
        "Generate a chat reply with the model compiled by llmopt, printing tokens as they come."))
    gen.add_argument("prompt", help="the user message")
    _add_model_argument(gen)
    gen.add_argument("--system", help="system message (default: the chat template's own)")
    gen.add_argument("--max-tokens", type=_positive_int, default=128, help="new tokens at most (default 128)")
    gen.add_argument("--temperature", type=_non_negative_float, default=0.0,
                     help="0 (default) decodes greedily; above 0 samples")
    gen.add_argument("--top-k", type=_positive_int, help="sample only among the k most likely tokens")
    gen.add_argument("--seed", type=int, help="random seed for sampling")
    gen.add_argument("--lower", choices=("inductor", "eager"), default="inductor",
                     help="where llmopt lowers the rewritten graph (default inductor)")
    gen.add_argument("--no-compile", action="store_true", help="run the model eagerly, without torch.compile")
    gen.set_defaults(run=_generate)

    exp = commands.add_parser("explain", help="show what the llmopt backend does to a model", description=(
        "Compile the model once on a short prompt and print llmopt's report."))
    _add_model_argument(exp)
    exp.add_argument("--prompt", default=EXPLAIN_PROMPT, help="example input (default: %(default)r)")
    exp.add_argument("--lower", choices=("eager", "inductor"), default="eager",
                     help="lowering to include in the report (default eager: the report is about the rewrite)")
    exp.set_defaults(run=_explain)
    return parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'smollm2' (default, embedded), a local Hugging Face directory or a .gguf file")


def _generate(args) -> int:
    import torch

    from llmopt.runtime.generate import GenerationStats, generate_stream, warm_up

    model, tokenizer = _load(args.model)
    prompt_ids = _chat_prompt(tokenizer, args.prompt, args.system)
    if args.no_compile:
        runner, compile_s = model, None
    else:
        _progress(f"compiling with torch.compile(backend='llmopt', lower={args.lower}); "
                  "the first calls take a while on CPU ...")
        runner = torch.compile(model, backend="llmopt", options={"lower": args.lower})
        # Compilation happens on the first prefill and decode calls; doing them
        # here keeps it out of the prefill and tokens/s figures.
        compile_s = warm_up(runner, prompt_ids, args.max_tokens)

    stats = GenerationStats()
    tokens: list[int] = []
    printed = ""
    stream = generate_stream(runner, tokenizer, prompt_ids, args.max_tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, stats=stats)
    for token in stream:
        tokens.append(token)
        # Decode the whole reply and print what is new: a token's text can
        # depend on its neighbours (leading spaces, multi-byte characters).
        text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):
            continue  # an unfinished multi-byte character; wait for the rest
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    print()

    compiled = "no compile" if compile_s is None else f"compile {compile_s:.1f} s, lower={args.lower}"
    print(f"[{stats.new_tokens} tokens, {stats.decode_tokens_per_s:.1f} tokens/s decode, "
          f"prefill {stats.prefill_s:.2f} s, {compiled}]", file=sys.stderr)
    return 0


def _explain(args) -> int:
    import llmopt

    model, tokenizer = _load(args.model)
    prompt_ids = _chat_prompt(tokenizer, args.prompt, None)
    _progress(f"compiling with the llmopt backend (lower={args.lower}) ...")
    report = llmopt.explain(model, prompt_ids, options={"lower": args.lower})
    print(report)
    return 0


def _load(name: str):
    from llmopt.models import ModelNotInstalledError, load

    _progress(f"loading {name} ...")
    start = time.perf_counter()
    try:
        loaded = load(name)
    except (ModelNotInstalledError, ValueError) as error:
        raise UsageError(str(error)) from None
    _progress(f"loaded {name} in {time.perf_counter() - start:.1f} s")
    return loaded


def _chat_prompt(tokenizer, prompt: str, system: str | None):
    """Token ids (1, length) for one user turn, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        if system:
            raise UsageError("--system needs a model with a chat template")
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    # transformers 5 returns a BatchEncoding here, not a tensor.
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return encoded["input_ids"]


def _progress(message: str) -> None:
    print(f"llmopt: {message}", file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
