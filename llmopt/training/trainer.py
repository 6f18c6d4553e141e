"""The Trainer: a causal-LM training loop on llmopt's compiled model.

One optimizer step: the step's micro-batches are drawn first, so the number of
non-padding target tokens ``N`` of the whole accumulated batch (summed over
data-parallel ranks) is known; each micro-batch's backward then takes
``(sum of its per-token losses + its extra_loss) * world_size / N`` (DDP averages
gradients over ranks, hence ``world_size``), and the last one also adds the
per-step parameter penalties (L1, L2). The step's gradient is therefore the
gradient of one mean over all ``N`` tokens, whatever the split into
micro-batches and ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from llmopt.errors import LLMOptConfigError
import llmopt.training.checkpoint as ckpt
import llmopt.training.data as data_mod
import llmopt.training.recompute as recompute_mod
import llmopt.training.regularize as regularize
from llmopt.training.config import TrainConfig
from llmopt.training.memory import keep_freed_cpu_memory
from llmopt.training.optim import build_optimizer, build_scheduler

__all__ = ["Trainer", "TrainResult"]

ExtraLoss = Callable[[torch.nn.Module, dict, object], Optional[torch.Tensor]]


@dataclass
class TrainResult:
    """What a run did. ``steps``: one dict per optimizer step (``step`` 1-based, ``loss``:
    mean per-token loss of the step's batch, ``lr``, ``grad_norm`` (before clipping; None without clipping),
    ``tokens``, ``seconds``, ``tokens_per_second``); ``evals``: one dict per evaluation
    (``step``, ``loss``, ``perplexity``)."""

    steps: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    best_step: Optional[int] = None
    best_eval_loss: Optional[float] = None
    stopped_early: bool = False
    micro_batch_size: Optional[int] = None
    train_seconds: float = 0.0
    tokens: int = 0

    @property
    def losses(self) -> list:
        return [s["loss"] for s in self.steps]

    @property
    def eval_losses(self) -> list:
        return [e["loss"] for e in self.evals]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"steps": self.steps, "evals": self.evals, "best_step": self.best_step,
                "best_eval_loss": self.best_eval_loss, "stopped_early": self.stopped_early,
                "micro_batch_size": self.micro_batch_size, "train_seconds": self.train_seconds,
                "tokens": self.tokens, "tokens_per_second": self.tokens_per_second}


class Trainer:
    """Train a causal LM (a Hugging Face ``*ForCausalLM`` or any module that takes
    ``input_ids``/``attention_mask``/``position_ids`` and returns ``.logits``).

    ``train_data`` / ``eval_data``: token-id sequences (lists or 1-D tensors), dicts
    with ``input_ids`` and ``labels`` (-100: no loss), or a text path (tokenised with
    ``tokenizer`` and cut into ``seq_len`` windows). See :class:`TrainConfig` for the options.

    Hooks for subclasses (distillation, early-exit training):

    * :meth:`compute_loss` ``(model, batch) -> (loss_sum, n_tokens)``: the SUM of
      per-token losses over this micro-batch's non-padding targets, and their count.
      The trainer divides by the whole accumulated batch's count itself. Store the
      model outputs in ``self.last_outputs`` (the default does, via :meth:`forward`)
      so that :meth:`extra_loss` gets them.
    * :meth:`extra_loss` ``(model, batch, outputs) -> Tensor | None``: an extra term of
      this micro-batch, on the same footing as ``loss_sum`` (a sum over its tokens:
      it is divided by the same total token count). The default sums the callables
      given as ``Trainer(..., extra_losses=[fn, ...])``, each with the same signature.
      ``model`` is the model that ran the forward (compiled/DDP-wrapped);
      ``self.model`` is the plain module.
    * :meth:`penalty` ``(model) -> Tensor | None``: a per-optimizer-step term added
      once, unnormalised (the default: L1 and L2 penalties of the config).
    * :meth:`model_inputs` ``(batch) -> dict``: the keyword arguments of the forward.
    """

    def __init__(self, model: torch.nn.Module, config: Optional[TrainConfig] = None, train_data=None,
                 eval_data=None, *, tokenizer=None, extra_losses: Sequence[ExtraLoss] = (),
                 callbacks: Sequence[Callable] = ()):
        if train_data is None:
            raise LLMOptConfigError("Trainer needs train_data")
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise LLMOptConfigError(f"Trainer's config must be a TrainConfig, got {type(self.config).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.extra_losses = list(extra_losses)
        self.callbacks = list(callbacks)
        self.device = next(model.parameters()).device
        self.pad_id = _pad_id(model, tokenizer)
        cfg = self.config

        self.rank, self.world_size = _dist_rank_world()
        self.train_rows = data_mod.prepare_rows(train_data, tokenizer=tokenizer, seq_len=cfg.seq_len,
                                                packing=cfg.packing)
        self.eval_rows = (None if eval_data is None else
                          data_mod.prepare_rows(eval_data, tokenizer=tokenizer, seq_len=cfg.seq_len,
                                                packing=cfg.packing))
        self.batches = data_mod.Batches(self.train_rows, shuffle=cfg.shuffle, seed=cfg.seed, pad_id=self.pad_id)

        regularize.set_dropout(model, cfg)
        self._check_recompute(model)
        recompute_mod.apply(model, cfg.recompute)
        self.train_model = self._wrap(model)
        # Under Inductor the loss is one fused kernel over the logits each way (slice, upcast,
        # log-softmax, gather) instead of eager ops that each write a logits-sized tensor.
        # Straight to Inductor: llmopt has nothing to rewrite there, and the model's Report
        # stays llmopt.last_report().
        lower = dict(cfg.compile_options or {}).get("lower", "inductor")
        self._cross_entropy_sum = (torch.compile(_cross_entropy_sum, backend="inductor")
                                   if cfg.compile and lower == "inductor" else _cross_entropy_sum)
        # Not under data parallel: there a gloo rank aborted at exit ("terminate called
        # without an active exception") in 3 of 26 two-process runs with it, 0 of 26 without.
        if cfg.keep_cpu_memory and self.device.type == "cpu" and self.world_size == 1:
            keep_freed_cpu_memory()
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        # fp16's narrow exponent underflows small gradients: scale the loss up, unscale
        # before clipping, skip a step whose gradients overflowed (torch.amp.GradScaler,
        # which has CPU kernels as well as CUDA ones). bf16 has fp32's range: no scaler.
        self.scaler = torch.amp.GradScaler(self.device.type if self.device.type in ("cuda", "cpu") else "cuda",
                                           enabled=cfg.precision == "fp16" and self.device.type in ("cuda", "cpu"))
        self.micro_batch_size = cfg.micro_batch_size if cfg.micro_batch_size != "auto" else None
        self.step = 0
        self.result = TrainResult()
        self.best_loss = math.inf
        self.bad_evals = 0
        self._best_state = None
        self.last_outputs = None

    # ------------------------------------------------------------------ set-up
    def _wrap(self, model):
        wrapped = model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None)
        if self.config.compile:
            wrapped = torch.compile(wrapped, backend="llmopt", options=dict(self.config.compile_options or {}))
        return wrapped

    def has_random_ops(self, model) -> bool:
        """Whether training draws random numbers in the compiled forward (dropout); a
        subclass that adds its own random ops (e.g. layer dropout) says so here."""
        return bool(regularize.active_dropout(model))

    def _check_recompute(self, model) -> None:
        budget = self.config.recompute
        lower = dict(self.config.compile_options or {}).get("lower", "inductor")
        if budget in ("full", "selective") and self.config.compile and lower != "inductor" \
                and self.has_random_ops(model):
            # Compiled around the checkpoints but not through AOTAutograd (lower="eager"), the
            # recompute does not replay the forward's random numbers: tests/training/
            # test_recompute.py shows the gradients then disagree with the finite differences
            # (under Inductor they agree).
            raise LLMOptConfigError(
                f"train option 'recompute'={budget!r} with compile=True, lower={lower!r} and dropout on "
                f"({', '.join(regularize.active_dropout(model)[:3]) or 'random ops'}) is refused: that compiled "
                f"checkpoint recomputes dropout with other random numbers, so the gradients would be wrong. "
                f"Lower to 'inductor', use compile=False, recompute='none', or dropout 0")
        if isinstance(budget, str):
            return
        if lower != "inductor":
            raise LLMOptConfigError(f"train option 'recompute' as a memory budget needs Inductor lowering (the "
                                    f"min-cut partitioner's budget), not compile_options lower={lower!r}")
        if float(budget) < 1.0 and self.has_random_ops(model):
            # pytorch/pytorch#190758: under activation_memory_budget < 1 the partitioner may
            # recompute a random op in the backward with fresh randomness (silently wrong
            # gradients); tests/training/test_recompute.py checks the bug is still there.
            raise LLMOptConfigError(
                f"train option 'recompute'={budget!r} (a memory budget below 1) with dropout on "
                f"({', '.join(regularize.active_dropout(model)[:3]) or 'random ops'}) is refused: PyTorch's "
                f"budget partitioner recomputes random ops with fresh randomness (pytorch/pytorch#190758), "
                f"so the gradients would be wrong. Use recompute='selective' or 'full', or set the dropout to 0")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _budget(self):
        if isinstance(self.config.recompute, str):
            return contextlib.nullcontext()
        return recompute_mod.budget_context(float(self.config.recompute))

    # ------------------------------------------------------------------ hooks
    def model_inputs(self, batch: dict) -> dict:
        """The forward's keyword arguments: with packing, a block-diagonal causal
        4-D boolean mask (no attention across documents) and per-document position ids;
        without, the padding mask, left out when nothing is padded: the model's mask is
        then causal and built from shapes alone, which the compiled graph proves and
        runs as a causal kernel (llmopt/passes/fuse_attention_masks.py)."""
        inputs = {"input_ids": batch["input_ids"].to(self.device), "use_cache": False}
        if "document_ids" in batch:
            inputs["attention_mask"] = data_mod.document_mask(batch["document_ids"]).to(self.device)
            inputs["position_ids"] = batch["position_ids"].to(self.device)
        else:
            if not bool(batch["attention_mask"].all()):
                inputs["attention_mask"] = batch["attention_mask"].to(self.device)
            if "position_ids" in batch:
                inputs["position_ids"] = batch["position_ids"].to(self.device)
        return inputs

    def forward(self, model, batch: dict):
        """Run the model on the batch; the outputs are kept in ``self.last_outputs``."""
        outputs = model(**self.model_inputs(batch))
        self.last_outputs = outputs
        return outputs

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        """(sum of per-token cross-entropies over non-padding targets of this micro-batch,
        number of those tokens). Targets follow Hugging Face's shift: position t predicts
        ``labels[t + 1]``; the loss is taken in fp32."""
        outputs = self.forward(model, batch)
        labels = batch["labels"].to(self.device)
        return self._cross_entropy_sum(outputs.logits, labels), _target_count(labels)

    def extra_loss(self, model, batch: dict, outputs) -> Optional[torch.Tensor]:
        """Extra terms of this micro-batch (sums over its tokens; see the class docstring)."""
        total = None
        for fn in self.extra_losses:
            term = fn(model, batch, outputs)
            if term is not None:
                total = term if total is None else total + term
        return total

    def penalty(self, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """Per-step parameter penalties: ``l1_penalty * sum|p|`` and ``l2_penalty / 2 * sum p^2``."""
        return regularize.penalty(model, self.config)

    # ------------------------------------------------------------------ training
    def train(self, resume_from=None) -> TrainResult:
        cfg = self.config
        if self.micro_batch_size is None:
            from llmopt.training.memory import auto_micro_batch_size

            self.micro_batch_size = auto_micro_batch_size(self)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            torch.manual_seed(cfg.seed)
        self.result.micro_batch_size = self.micro_batch_size
        progress = _Progress(cfg.max_steps, self.step, enabled=cfg.progress and self.rank == 0)
        log = _JsonLog(cfg.output_dir, self.rank)
        try:
            while self.step < cfg.max_steps:
                record = self.train_step()
                progress.update(record)
                if self.step % cfg.log_every == 0:
                    log.write({"event": "step", **record})
                for callback in self.callbacks:
                    callback(self, record)
                stop = False
                if self.eval_rows is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    stop = self._evaluate_and_track(log)
                if cfg.output_dir and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint(f"{cfg.output_dir}/last")
                if stop:
                    self.result.stopped_early = True
                    break
            if self.eval_rows is not None and (not cfg.eval_every or self.step % cfg.eval_every != 0) \
                    and not self.result.stopped_early:
                self._evaluate_and_track(log)
            if cfg.output_dir:
                self.save_checkpoint(f"{cfg.output_dir}/last")
            if cfg.restore_best and self.result.best_step is not None and self.result.best_step != self.step:
                self._restore_best()
        finally:
            progress.close()
        log.write({"event": "end", **{k: v for k, v in self.result.to_dict().items() if k not in ("steps", "evals")}})
        if cfg.output_dir and self.rank == 0:
            from llmopt.training.report import write_run_files

            write_run_files(cfg.output_dir, self.result, cfg)
        return self.result

    def train_step(self) -> dict:
        """One optimizer step; returns its record (also appended to ``self.result.steps``)."""
        cfg = self.config
        start = time.perf_counter()
        self.train_model.train()
        micro_batches = self.batches.step(self.micro_batch_size, cfg.grad_accum_steps, self.rank, self.world_size)
        local = torch.tensor([sum(data_mod.count_targets(b) for b in micro_batches),
                              sum(int(b["attention_mask"].sum()) for b in micro_batches)], dtype=torch.float64)
        total_targets, total_tokens = (int(x) for x in _all_reduce(local, self.world_size))
        if total_targets == 0:
            raise LLMOptConfigError("a training step has no target token (every label is -100)")
        loss_sum = torch.zeros((), dtype=torch.float64)
        scale = self.world_size / total_targets
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world_size == 1 else _no_sync(self.train_model)
            with sync:
                with self._autocast(), self._budget():
                    summed, _ = self.compute_loss(self.train_model, batch)
                    extra = self.extra_loss(self.train_model, batch, self.last_outputs)
                loss_sum += summed.detach().double().cpu()
                objective = (summed if extra is None else summed + extra) * scale
                if last:
                    penalty = self.penalty(self.model)
                    if penalty is not None:
                        objective = objective + penalty
                self.scaler.scale(objective).backward()
            self.last_outputs = None
        self.scaler.unscale_(self.optimizer)
        grad_norm = None  # without clipping the norm is not computed (a pass over every gradient)
        if cfg.max_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = float(_all_reduce(loss_sum.reshape(1), self.world_size)[0]) / total_targets
        seconds = time.perf_counter() - start
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": total_tokens,
                  "seconds": seconds, "tokens_per_second": total_tokens / seconds if seconds > 0 else float("nan")}
        self.result.steps.append(record)
        self.result.tokens += total_tokens
        self.result.train_seconds += seconds
        return record

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data=None) -> dict:
        """Mean per-token loss and perplexity on ``data`` (default: the eval data),
        in eval mode (no dropout), split across data-parallel ranks."""
        rows = self.eval_rows if data is None else data_mod.prepare_rows(
            data, tokenizer=self.tokenizer, seq_len=self.config.seq_len, packing=self.config.packing)
        if rows is None:
            raise LLMOptConfigError("evaluate() needs data: pass it, or eval_data to the Trainer")
        was_training = self.model.training
        self.train_model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        try:
            mine = rows[self.rank::self.world_size]
            for batch in data_mod.eval_batches(mine, self.config.eval_batch_size, self.pad_id):
                with self._autocast():
                    summed, count = token_cross_entropy(self.forward(self.eval_model, batch).logits,
                                                        batch["labels"].to(self.device))
                totals += torch.tensor([float(summed), count], dtype=torch.float64)
                self.last_outputs = None
        finally:
            self.train_model.train(was_training)
        loss_sum, count = _all_reduce(totals, self.world_size).tolist()
        loss = loss_sum / count if count else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}

    @property
    def eval_model(self):
        # DDP's forward would sync buffers and expect a backward; evaluation needs neither
        if self.world_size == 1:
            return self.train_model
        if getattr(self, "_eval_model", None) is None:
            self._eval_model = (torch.compile(self.model, backend="llmopt",
                                              options=dict(self.config.compile_options or {}))
                                if self.config.compile else self.model)
        return self._eval_model

    def _evaluate_and_track(self, log) -> bool:
        """Evaluate, keep the best, and say whether to stop early."""
        cfg = self.config
        metrics = self.evaluate()
        entry = {"step": self.step, **metrics}
        self.result.evals.append(entry)
        log.write({"event": "eval", **entry})
        if metrics["loss"] < self.best_loss - cfg.min_delta:
            self.best_loss = metrics["loss"]
            self.bad_evals = 0
            self.result.best_step, self.result.best_eval_loss = self.step, metrics["loss"]
            self._keep_best()
        else:
            self.bad_evals += 1
        return cfg.patience is not None and self.bad_evals >= cfg.patience

    def _keep_best(self):
        if self.config.output_dir:
            self.save_checkpoint(f"{self.config.output_dir}/best")
        else:
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _restore_best(self):
        if self.config.output_dir:
            ckpt.load_weights(self.model, f"{self.config.output_dir}/best")
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path) -> None:
        """Weights (safetensors) plus optimizer, scheduler, scaler, RNG states, data
        position, step and history: everything :meth:`load_checkpoint` needs to go on
        exactly as if uninterrupted. Only rank 0 writes (ranks hold the same state)."""
        if self.rank == 0:
            ckpt.save(path, self)
        _barrier(self.world_size)

    def load_checkpoint(self, path) -> None:
        ckpt.load(path, self)


# ---------------------------------------------------------------------- helpers


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropies of ``logits[:, :-1]`` against ``labels[:, 1:]`` where the
    label is not -100, their count), in fp32 (fp64 if the logits are fp64)."""
    return _cross_entropy_sum(logits, labels), _target_count(labels)


def _target_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != data_mod.IGNORE).sum())


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), labels[:, 1:].reshape(-1),
                           ignore_index=data_mod.IGNORE, reduction="sum")


def _pad_id(model, tokenizer) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(value, int):
            return value
    return 0


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return tensor
    import torch.distributed as dist

    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _no_sync(model):
    inner = getattr(model, "_orig_mod", model)  # a compiled DDP module
    return inner.no_sync()


class _Progress:
    """tqdm if installed, else a plain line per step."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            except ImportError:
                self.total = total

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        text = f"loss {record['loss']:.4f} lr {record['lr']:.2e} tok/s {record['tokens_per_second']:.0f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        else:
            print(f"step {record['step']}/{self.total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _JsonLog:
    """One JSON object per line in ``output_dir/log.jsonl`` (rank 0 only)."""

    def __init__(self, output_dir, rank: int):
        self.file = None
        if output_dir and rank == 0:
            import os

            os.makedirs(output_dir, exist_ok=True)
            self.file = open(f"{output_dir}/log.jsonl", "a")

    def write(self, entry: dict) -> None:
        if self.file is not None:
            import json

            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def __del__(self):
        if self.file is not None:
            self.file.close()
