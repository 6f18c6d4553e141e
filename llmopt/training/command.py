"""``llmopt train``: the arguments (one flag per :class:`TrainConfig` option, over an
optional ``--config`` file) and the run. Imports only argparse at module level, so
that ``llmopt --help`` stays quick; ``llmopt.cli`` adds the sub-command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

__all__ = ["add_arguments", "config_from_args", "run"]

# options the command sets itself or that only make sense from Python
_SKIPPED = {"compile_options", "output_dir", "progress"}


def _number_or(word: str):
    def parse(text: str):
        if text == word:
            return text
        try:
            return int(text) if text.isdigit() else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {word!r}, got {text!r}") from None
    return parse


def _recompute(text: str):
    if text in ("none", "full", "selective"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'none', 'full', 'selective' or a memory budget in [0, 1], got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from llmopt.training.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig

    parser.add_argument("--train", required=True, metavar="PATH",
                        help="training text: a file, or a folder of *.txt files (tokenised, cut into --seq-len windows)")
    parser.add_argument("--eval", metavar="PATH", help="held-out text evaluated every --eval-every steps")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="checkpoints (best/, last/), log.jsonl, result.json and loss.png go here")
    parser.add_argument("--config", metavar="FILE", help="a JSON (or YAML) file of TrainConfig options; flags override it")
    parser.add_argument("--random-model", action="store_true",
                        help="a tiny random Llama and a byte tokenizer instead of --model (for smoke tests)")
    parser.add_argument("--lower", choices=("inductor", "eager"), default=None,
                        help="where llmopt lowers the compiled graphs (default inductor)")
    parser.add_argument("--resume", metavar="DIR", help="continue from a checkpoint folder (e.g. OUTPUT/last)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    special = {"micro_batch_size": _number_or("auto"), "recompute": _recompute}
    choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS}
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training options (see TrainConfig; default: the config file's, else TrainConfig's)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in _SKIPPED:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        kind = hints[field.name]
        text = f"(default {default!r})"
        if field.name in special:
            group.add_argument(flag, type=special[field.name], default=None, help=text)
        elif field.name in choices:
            group.add_argument(flag, choices=choices[field.name], default=None, help=text)
        elif isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, tuple) or field.name == "betas":
            group.add_argument(flag, nargs="+", type=float if field.name == "betas" else str, default=None,
                               help=text)
        elif isinstance(default, int) and "float" not in str(kind).lower():
            group.add_argument(flag, type=int, default=None, help=text)
        else:
            group.add_argument(flag, type=float, default=None, help=text)


def config_from_args(args):
    from llmopt.training.config import TrainConfig

    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None and field.name not in _SKIPPED:
            base[field.name] = tuple(value) if isinstance(value, list) else value
    base["output_dir"] = args.output_dir
    base["progress"] = not args.no_progress
    if args.lower is not None:
        base["compile_options"] = {**(base.get("compile_options") or {}), "lower": args.lower}
    return TrainConfig.from_dict(base)


class ByteTokenizer:
    """Bytes 1..255 as token ids, 0 as end of text: a tokenizer for the random model."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b or 1 for b in text.encode("utf-8")]}


def run(args, load) -> int:
    """``load(name) -> (model, tokenizer)`` is the CLI's model loader."""
    from llmopt.training.trainer import Trainer

    config = config_from_args(args)
    if args.random_model:
        from llmopt.models import random_llama

        model, tokenizer = random_llama(num_layers=2, seed=config.seed), ByteTokenizer()
    else:
        model, tokenizer = load(args.model)
        model = model.float()
    trainer = Trainer(model, config, args.train, eval_data=args.eval, tokenizer=tokenizer)
    result = trainer.train(resume_from=args.resume)
    last = result.steps[-1] if result.steps else {}
    print(f"steps: {len(result.steps)}  final loss: {last.get('loss', float('nan')):.4f}  "
          f"tokens/s: {result.tokens_per_second:.0f}  micro-batch: {result.micro_batch_size}")
    for entry in result.evals:
        print(f"eval at step {entry['step']}: loss {entry['loss']:.4f}  perplexity {entry['perplexity']:.2f}")
    if result.best_step is not None:
        print(f"best: step {result.best_step} (eval loss {result.best_eval_loss:.4f})"
              f"{'; stopped early' if result.stopped_early else ''}; weights restored from it"
              if config.restore_best else "")
    print(f"wrote {args.output_dir}/: result.json, log.jsonl, loss.png, last/ (model.safetensors, "
          f"trainer_state.pt){', best/' if result.best_step is not None else ''}", file=sys.stdout)
    return 0
