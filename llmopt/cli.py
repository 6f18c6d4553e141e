"""The ``llmopt`` command line: ``generate`` (one prompt on the serving engine),
``serve`` (the OpenAI-compatible server), ``explain`` (what the backend rewrites),
``eval`` (perplexity), ``export-onnx`` (an ONNX model for ONNX Runtime),
``train`` (training on a text: llmopt.training) and ``distill`` (a teacher into a student).

Heavy imports (torch, transformers) happen inside the commands so that
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
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
    gen.add_argument("--no-compile", action="store_true", help="run the plain Hugging Face cache loop: no torch.compile, no serving engine")
    gen.add_argument("--wait-for-compile", action="store_true",
                     help="answer only once the engine is compiled (default: an uncompiled loop answers at once "
                          "and the compiled engine takes over when it is ready; --quantize always waits)")
    _add_speculative_argument(gen)
    _add_tensor_parallel_argument(gen)
    gen.set_defaults(run=_generate)

    exp = commands.add_parser("explain", help="show what the llmopt backend does to a model", description=(
        "Compile the model once on a short prompt and print llmopt's report."))
    _add_model_argument(exp)
    exp.add_argument("--prompt", default=EXPLAIN_PROMPT, help="example input (default: %(default)r)")
    exp.add_argument("--lower", choices=("eager", "inductor"), default="eager",
                     help="lowering to include in the report (default eager: the report is about the rewrite)")
    exp.set_defaults(run=_explain)

    srv = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API", description=(
        "Serve /v1/completions, /v1/chat/completions (streaming too), /v1/models and /health "
        "with the llmopt engine; concurrent requests are batched together."))
    _add_model_argument(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--lower", choices=("inductor", "eager"), default="inductor",
                     help="where llmopt lowers the rewritten graph (default inductor)")
    srv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                     help="weights and KV cache dtype (default float32)")
    srv.add_argument("--max-num-seqs", type=_positive_int, help="most requests in one engine step")
    srv.add_argument("--max-model-len", type=_positive_int, help="most tokens (prompt + output) per request")
    srv.add_argument("--kv-cache-gib", type=_positive_float, help="KV cache budget in GiB (CPU)")
    srv.add_argument("--served-model-name", help="the model name clients use (default: --model)")
    srv.add_argument("--api-key", default=os.environ.get("LLMOPT_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $LLMOPT_API_KEY; none: open)")
    srv.add_argument("--max-request-bytes", type=_positive_int, default=8 * 1024 * 1024,
                     help="largest request body accepted, 413 above (default 8 MiB)")
    srv.add_argument("--max-waiting", type=_positive_int, default=256,
                     help="sequences that may wait beyond the running batch; 503 with Retry-After when full "
                          "(default 256)")
    _add_speculative_argument(srv)
    srv.add_argument("--cascade", type=_json_object, metavar="JSON",
                     help='serve a cascade of models instead of --model, e.g. \'{"models": [{"model": "smollm2", '
                          '"compile_options": {"quantize": "int4"}}, "smollm2"], "deferral": "token", '
                          '"threshold": 0.5, "top_k": 2}\' (deferral token or response; see the README)')
    _add_tensor_parallel_argument(srv)
    srv.set_defaults(run=_serve)
    _add_eval_parser(commands)
    _add_export_onnx_parser(commands)
    _add_train_parser(commands)
    _add_distill_parser(commands)
    return parser


def _add_speculative_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=("int8", "int4", "fp8", "w8a8"),
                        help="quantize the served model's linear layers (the compiler's quantize option)")
    parser.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                             "(methods: ngram, draft_model, layer_skip; see the README)")


def _add_tensor_parallel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel-size", type=_positive_int, default=1, metavar="N",
                        help="split the model over N processes (tensor parallelism; default 1): started here, "
                             "or the N ranks torchrun launched (see the README)")


def _compile_options(args) -> dict:
    return {"quantize": args.quantize} if args.quantize else {}


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"method\": \"ngram\"}'")
    return value


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'smollm2' (default, embedded), a local Hugging Face directory or a .gguf file")


def _generate(args) -> int:
    if not args.no_compile and not args.wait_for_compile and not args.quantize and args.tensor_parallel_size == 1:
        return _generate_quick_start(args)
    model, tokenizer = _load(args.model)
    prompt_ids = _chat_prompt(tokenizer, args.prompt, args.system)
    if args.no_compile:
        return _generate_uncompiled(args, model, tokenizer, prompt_ids)
    from llmopt.runtime.llm import LLM
    from llmopt.runtime.sampling_params import SamplingParams

    _progress(f"compiling with torch.compile(backend='llmopt', lower={args.lower}) for the serving "
              "engine (paged KV cache); the first call takes a while on CPU ...")
    from llmopt.errors import LLMOptConfigError

    try:
        llm = LLM(model, tokenizer, lower=args.lower, kv_cache_memory_gib=0.5,
                  compile_options=_compile_options(args), speculative_config=args.speculative_config,
                  tensor_parallel_size=args.tensor_parallel_size)  # a torchrun worker rank serves, exits here
    except LLMOptConfigError as error:
        raise UsageError(str(error)) from None
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k or 0, seed=args.seed,
                            max_tokens=args.max_tokens)
    printed, output, start = "", None, time.perf_counter()
    for output in llm.stream([prompt_ids[0].tolist()], params):
        sys.stdout.write(output.text[len(printed):])
        sys.stdout.flush()
        printed = output.text
    print()
    metrics, count = output.metrics, len(output.token_ids)
    decode_s = metrics.finished_time - metrics.first_token_time
    rate = (count - 1) / decode_s if count > 1 and decode_s > 0 else 0.0
    print(f"[{count} tokens, {rate:.1f} tokens/s decode, prefill {metrics.first_token_time - start:.2f} s, "
          f"compile {llm.engine.warmup_seconds:.1f} s, lower={args.lower}]", file=sys.stderr)
    return 0


def _generate_quick_start(args) -> int:
    """The default: the first tokens from an uncompiled worker process, the rest from the
    compiled engine once it is ready (``llmopt.runtime.quick_start``)."""
    import os

    from llmopt.runtime import quick_start
    from llmopt.runtime.sampling_params import SamplingParams

    request = {"model": args.model, "prompt": args.prompt, "system": args.system, "max_tokens": args.max_tokens,
               "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}
    loaded: dict = {}

    def params(max_tokens: int, **extra) -> SamplingParams:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k or 0, seed=args.seed,
                              max_tokens=max_tokens, **extra)

    def build_engine():  # quiet: the reply is streaming on stdout meanwhile
        from transformers.utils import logging as hf_logging

        from llmopt.models import load

        hf_logging.disable_progress_bar()  # its bar would land in the middle of the reply
        model, tokenizer = load(args.model)
        loaded["tokenizer"] = tokenizer
        llm = _engine(args, model, tokenizer)
        # One short request compiles the prefill and the decode step before the switch.
        llm.generate([_chat_prompt(tokenizer, args.prompt, args.system)[0].tolist()],
                     SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        return llm

    def continue_on_engine(llm, token_ids, max_tokens):
        for output in llm.stream([token_ids], params(max_tokens)):
            yield output.token_ids

    _engine_config(args)  # a bad option or model fails here, before anything starts
    from llmopt.models import ModelNotInstalledError, source

    try:
        source(args.model)
    except (ModelNotInstalledError, ValueError) as error:
        raise UsageError(str(error)) from None
    _progress(f"loading {args.model}; an uncompiled loop answers while the engine compiles "
              "(--wait-for-compile: answer from the compiled engine only) ...")
    stats = quick_start.QuickStartStats()
    tokens: list[int] = []
    printed, start = "", time.perf_counter()
    try:
        for token, text in quick_start.stream(request, build_engine, continue_on_engine, say=_progress,
                                              stats=stats):
            tokens.append(token)
            if text is None:  # an engine token: decode with the ones before it
                text = loaded["tokenizer"].decode(tokens, skip_special_tokens=True,
                                                  clean_up_tokenization_spaces=False)
                if text.endswith("\ufffd"):
                    continue
                text = text[len(printed):]
            sys.stdout.write(text)
            sys.stdout.flush()
            printed += text
    except quick_start.QuickStartFailed as error:
        raise UsageError(str(error)) from None
    print()
    elapsed = time.perf_counter() - start
    where = (f"{stats.from_worker} uncompiled, {stats.from_engine} from the compiled engine after "
             f"{stats.switched_at_s:.1f} s" if stats.switched_at_s is not None else
             "all uncompiled: the reply ended before the engine was compiled")
    print(f"[{len(tokens)} tokens ({where}); first token {stats.first_token_s or 0:.1f} s, "
          f"{elapsed:.1f} s in all]", file=sys.stderr)
    if quick_start.engine_still_building(stats):
        # The compile thread cannot be stopped; leave without waiting for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _engine_options(args) -> dict:
    return {"lower": args.lower, "kv_cache_memory_gib": 0.5, "compile_options": _compile_options(args),
            "speculative_config": args.speculative_config}


def _engine_config(args):
    from llmopt.errors import LLMOptConfigError
    from llmopt.runtime.engine_config import EngineConfig

    try:
        return EngineConfig.from_kwargs(**_engine_options(args))
    except LLMOptConfigError as error:
        raise UsageError(str(error)) from None


def _engine(args, model, tokenizer):
    from llmopt.errors import LLMOptConfigError
    from llmopt.runtime.llm import LLM

    try:
        return LLM(model, tokenizer, **_engine_options(args))
    except LLMOptConfigError as error:
        raise UsageError(str(error)) from None


def _generate_uncompiled(args, model, tokenizer, prompt_ids) -> int:
    """--no-compile: the plain Hugging Face cache loop, without the engine (for comparison)."""
    from llmopt.runtime.generate import GenerationStats, generate_stream

    stats = GenerationStats()
    tokens: list[int] = []
    printed = ""
    stream = generate_stream(model, tokenizer, prompt_ids, args.max_tokens, temperature=args.temperature,
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
    print(f"[{stats.new_tokens} tokens, {stats.decode_tokens_per_s:.1f} tokens/s decode, "
          f"prefill {stats.prefill_s:.2f} s, no compile]", file=sys.stderr)
    return 0


def _explain(args) -> int:
    import llmopt

    model, tokenizer = _load(args.model)
    prompt_ids = _chat_prompt(tokenizer, args.prompt, None)
    _progress(f"compiling with the llmopt backend (lower={args.lower}) ...")
    report = llmopt.explain(model, prompt_ids, options={"lower": args.lower})
    print(report)
    return 0


def _serve(args) -> int:
    from llmopt.models import ModelNotInstalledError
    from llmopt.runtime.server import BindError, MissingServeExtra, serve

    options = {"model": args.model, "lower": args.lower, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
               "max_model_len": args.max_model_len, "kv_cache_memory_gib": args.kv_cache_gib,
               "compile_options": _compile_options(args) or None,
               "speculative_config": args.speculative_config, "tensor_parallel_size": args.tensor_parallel_size}
    if args.cascade is not None:  # it names its own models (and their compile options)
        from llmopt.errors import LLMOptConfigError
        from llmopt.runtime.cascade import Cascade

        try:
            options["model"] = Cascade.from_options(args.cascade)
        except LLMOptConfigError as error:
            raise UsageError(f"--cascade: {error}") from None
    _progress(f"loading {args.model} and starting the engine (lower={args.lower}) ...")
    if args.tensor_parallel_size > 1 and int(os.environ.get("RANK", 0)) > 0:
        from llmopt.runtime.llm import LLM

        LLM(**{k: v for k, v in options.items() if v is not None})  # a torchrun worker rank: serves rank 0, exits
    try:
        serve({k: v for k, v in options.items() if v is not None}, args.host, args.port, args.served_model_name,
              api_key=args.api_key or None, max_body_bytes=args.max_request_bytes, max_waiting=args.max_waiting)
    except (BindError, ModelNotInstalledError, MissingServeExtra, ValueError) as error:
        raise UsageError(str(error)) from None
    return 0


def _add_eval_parser(commands) -> None:
    ev = commands.add_parser("eval", help="measure perplexity on a text", description=(
        "Perplexity of the model on a text file (sliding windows: fixed context length and stride, each "
        "token scored once), with llmopt's quantization and pruning options; prints a table, optionally JSON."))
    ev.add_argument("--text", required=True, help="text file to score")
    _add_model_argument(ev)
    ev.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights dtype (default float32)")
    ev.add_argument("--context-length", type=_positive_int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--stride", type=_positive_int, default=256, help="tokens between window starts (default 256)")
    ev.add_argument("--max-tokens", type=_positive_int, help="score only the first N tokens of the text")
    ev.add_argument("--quantize", help="backend option 'quantize' (e.g. int8, int4, w8a8, fp8)")
    ev.add_argument("--group-size", type=_positive_int, help="backend option 'group_size' (int4)")
    ev.add_argument("--prune-method", choices=("magnitude", "wanda"), help="prune with this score (default magnitude)")
    ev.add_argument("--sparsity", type=_fraction, help="fraction pruned (default 0.5)")
    ev.add_argument("--prune-pattern", choices=("unstructured", "2:4", "heads", "channels"),
                    help="what is pruned (default unstructured); heads/channels shrink the layers")
    ev.add_argument("--method", choices=("rtn", "mse", "gptq"),
                    help="int4 rounding: rtn (min..max grids, what compiling does; the default), mse (grids "
                         "searched for the least error) or gptq (mse grids, then GPTQ); mse and gptq quantize "
                         "from --calibration before compiling")
    ev.add_argument("--quantize-skip", nargs="+", metavar="PATTERN", help="layers kept in float, e.g. lm_head")
    ev.add_argument("--calibration", metavar="FILE",
                    help="calibration text file for --prune-method wanda and --method gptq/mse (keep it apart "
                         "from --text)")
    ev.add_argument("--calibration-tokens", type=_positive_int, default=2048,
                    help="calibration tokens used (default 2048)")
    ev.add_argument("--lower", choices=("eager", "inductor"), default="eager",
                    help="lowering when compiled (default eager)")
    ev.add_argument("--compile", action="store_true",
                    help="compile with llmopt even when no option needs it (quantize/prune always compile)")
    ev.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    ev.set_defaults(run=_eval)


def _add_train_parser(commands) -> None:
    from llmopt.training.command import add_arguments

    tr = commands.add_parser("train", help="train (fine-tune) the model on a text", description=(
        "Train the model compiled by llmopt on a text (see llmopt.training.TrainConfig): progress bar with "
        "loss and tokens/s, a JSON log, a loss-curve PNG and checkpoints in --output-dir."))
    _add_model_argument(tr)
    add_arguments(tr)
    tr.set_defaults(run=_train)


def _train(args) -> int:
    from llmopt.errors import LLMOptConfigError
    from llmopt.training.command import run

    try:
        return run(args, _load)
    except (LLMOptConfigError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None


def _add_distill_parser(commands) -> None:
    from llmopt.training.command import add_arguments

    ds = commands.add_parser("distill", help="distill a teacher model into a (pruned) student on a text", description=(
        "Train a student on the teacher's next-token distributions (llmopt.training.distill): loss = "
        "ce_weight * CE + (1 - ce_weight) * T^2 * divergence. The student is --student, or the teacher "
        "pruned with --prune. Every training flag of 'llmopt train' applies."))
    ds.add_argument("--teacher", default=DEFAULT_MODEL, help="teacher model name or local path (default smollm2)")
    ds.add_argument("--student", help="student model name or path (default: a copy of the teacher, see --prune)")
    ds.add_argument("--prune", choices=("2:4", "unstructured", "heads", "channels"),
                    help="prune the student first (magnitude scores); 2:4/unstructured zeros stay zero in training")
    ds.add_argument("--prune-sparsity", type=_fraction, default=0.5, help="with --prune other than 2:4 (default 0.5)")
    ds.add_argument("--loss", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl",
                    help="divergence (default forward_kl)")
    ds.add_argument("--temperature", type=_positive_float, default=1.0, help="softmax temperature T (default 1)")
    ds.add_argument("--ce-weight", type=float, default=0.5,
                    help="weight of the hard-label cross-entropy in [0, 1] (default 0.5)")
    ds.add_argument("--chunk-size", type=_positive_int, default=1024, help="positions per divergence chunk (default 1024)")
    add_arguments(ds)
    ds.set_defaults(run=_distill)


def _distill(args) -> int:
    from llmopt.errors import LLMOptConfigError
    from llmopt.training.distill import run_command

    try:
        return run_command(args, _load)
    except (LLMOptConfigError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None


def _add_export_onnx_parser(commands) -> None:
    exp = commands.add_parser("export-onnx", help="export the llmopt-rewritten model to ONNX", description=(
        "Write the model as llmopt rewrites it to an ONNX file for ONNX Runtime: attention as "
        "com.microsoft GroupQueryAttention, int4/int8 weight-only linears as MatMulNBits, and (by default) "
        "past_key_values.N.key/value inputs with present.N.key/value outputs for token-by-token decoding. "
        "Inputs: input_ids and position_ids (batch, tokens), int64."))
    exp.add_argument("output", help="the .onnx file to write")
    _add_model_argument(exp)
    exp.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                     help="weights and activations dtype (default float32)")
    exp.add_argument("--quantize", choices=("int4", "int8"), help="weight-only quantization of linear layers")
    exp.add_argument("--group-size", type=_positive_int, help="int4 group length (32, 64, 128 or 256; default 32)")
    exp.add_argument("--quantize-skip", nargs="+", metavar="PATTERN", help="layers kept in float, e.g. lm_head")
    exp.add_argument("--no-kv-cache", action="store_true",
                     help="no past/present inputs and outputs: every call attends over its own tokens only")
    exp.add_argument("--accuracy-level", type=int, choices=range(5), default=0, metavar="{0..4}",
                     help="MatMulNBits accuracy_level: 0 (default) computes in the activations' dtype, "
                          "4 lets ONNX Runtime quantize them to int8 (faster, less exact)")
    exp.set_defaults(run=_export_onnx)


def _export_onnx(args) -> int:
    import torch

    from llmopt.config import LLMOptConfigError
    from llmopt.models import ModelNotInstalledError, load
    from llmopt.onnx import OnnxExportError, export_onnx

    options = {key: value for key, value in (("quantize", args.quantize), ("group_size", args.group_size),
                                             ("quantize_skip", args.quantize_skip)) if value is not None}
    try:
        _progress(f"loading {args.model} ({args.dtype}) ...")
        model, _ = load(args.model, dtype=getattr(torch, args.dtype))
        _progress(f"exporting to {args.output} (tracing with llmopt, then torch.onnx; takes a minute on CPU) ...")
        start = time.perf_counter()
        exported = export_onnx(model, args.output, options=options, kv_cache=not args.no_kv_cache,
                               accuracy_level=args.accuracy_level)
    except (OSError, ValueError, LLMOptConfigError, ModelNotInstalledError, OnnxExportError) as error:
        raise UsageError(str(error)) from None
    print(exported)
    print(f"(exported in {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


def _eval(args) -> int:
    import json

    import torch

    from llmopt import quality
    from llmopt.config import LLMOptConfigError
    from llmopt.models import ModelNotInstalledError, load

    setting = _eval_setting(args)
    try:
        text = quality.read_text(args.text)
        calibration = quality.read_text(args.calibration) if args.calibration else None
        _check_eval_options(setting)
        _progress(f"loading {args.model} ({args.dtype}) ...")
        model, tokenizer = load(args.model, dtype=getattr(torch, args.dtype))
        tokens = quality.tokenize(tokenizer, text)[: args.max_tokens]
        calibration_ids = quality.tokenize(tokenizer, calibration)[: args.calibration_tokens] if calibration else None
        _progress(f"scoring {setting.label} on {len(tokens)} tokens (context {args.context_length}, "
                  f"stride {args.stride}) ...")
        row = quality.evaluate(model, tokens, setting, args.context_length, args.stride, calibration_ids)
    except (OSError, ValueError, LLMOptConfigError, ModelNotInstalledError) as error:
        raise UsageError(str(error)) from None
    print(quality.format_table([row]))
    print(f"(perplexity over {row['tokens_scored']} tokens of {args.text}: windows of {row['context_length']} "
          f"tokens every {row['stride']}, each token scored once; seconds include compiling)")
    record = {"model": args.model, "text": args.text, "rows": [row]}
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(record, out, indent=2)
    return 0


def _check_eval_options(setting) -> None:
    """Bad option values fail before the slow model load."""
    from llmopt.config import LLMOptConfig
    from llmopt.pruning import PruneConfig

    if setting.prune:
        PruneConfig.from_options(setting.prune)
    LLMOptConfig.from_options({k: v for k, v in setting.backend_options().items() if k != "prune"})


def _eval_setting(args):
    from llmopt.quality import Setting

    if args.stride > args.context_length:
        raise UsageError(f"--stride {args.stride} is longer than --context-length {args.context_length}; "
                         "tokens between windows would go unscored")
    prune = None
    if args.prune_method or args.sparsity is not None or args.prune_pattern:
        method, pattern = args.prune_method or "magnitude", args.prune_pattern or "unstructured"
        if method == "wanda" and not args.calibration:
            raise UsageError("--prune-method wanda needs --calibration FILE (a calibration text)")
        default = 0.5 if pattern in ("unstructured", "2:4") else 0.25
        prune = {"method": method, "pattern": pattern,
                 "sparsity": args.sparsity if args.sparsity is not None else default}
    if args.method is not None and args.quantize != "int4":
        raise UsageError(f"--method {args.method} is for --quantize int4")
    if args.method in ("gptq", "mse") and not args.calibration:
        raise UsageError(f"--method {args.method} needs --calibration FILE (a calibration text, not the scored one)")
    if args.quantize_skip and not args.quantize:
        raise UsageError("--quantize-skip needs --quantize")
    return Setting(dtype=args.dtype, prune=prune, quantize=args.quantize, group_size=args.group_size,
                   compile=True if args.compile else None, lower=args.lower, quantize_method=args.method,
                   quantize_skip=tuple(args.quantize_skip or ()))


def _load(name: str):
    from llmopt.models import ModelNotInstalledError, load

    _progress(f"loading {name} ...")
    start = time.perf_counter()
    try:
        loaded = load(name, progress=_progress)
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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
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
