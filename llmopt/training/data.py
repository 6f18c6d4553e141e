"""Training data: examples from token ids or a text file, packing or padding, a resumable order.

An *example* is a pair of 1-D int64 tensors ``(input_ids, labels)`` of one
length; ``labels`` holds the target of each position's *own* token (Hugging
Face's convention: the loss predicts ``labels[t + 1]`` from position ``t``) and
``-100`` where no loss is taken. A *batch* is a dict of ``(B, T)`` tensors:
``input_ids``, ``labels``, ``attention_mask`` and, with packing, ``position_ids``
(restarting at 0 in each document) and ``document_ids`` (which document each
position of the row belongs to, -1 for padding; used to build the block-diagonal
causal mask so that no token attends across documents).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from llmopt.errors import LLMOptConfigError

__all__ = ["IGNORE", "as_examples", "pack", "collate", "Batches", "count_targets", "text_windows"]

IGNORE = -100


def text_windows(path: Union[str, os.PathLike], tokenizer, seq_len: int) -> list[torch.Tensor]:
    """A text file (or every ``*.txt`` file of a folder, sorted) tokenised and cut
    into consecutive windows of ``seq_len`` tokens (the shorter tail is kept)."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise LLMOptConfigError(f"no text files in {path}")
    if tokenizer is None:
        raise LLMOptConfigError("training on a text path needs a tokenizer: pass Trainer(..., tokenizer=...)")
    ids: list[int] = []
    for file in files:
        ids.extend(tokenizer(file.read_text(), add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    tensor = torch.tensor(ids, dtype=torch.long)
    return [w for w in tensor.split(seq_len) if w.numel() > 1]


def as_examples(data, *, tokenizer=None, seq_len: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalise training data to a list of ``(input_ids, labels)`` examples.

    Accepted: a text path (``str``/``Path``: see :func:`text_windows`), or a sequence
    whose items are token-id lists, 1-D tensors, or dicts with ``input_ids`` and
    optionally ``labels`` (``-100`` marks a position without loss, e.g. a prompt).
    Sequences longer than ``seq_len`` are cut into windows.
    """
    if isinstance(data, (str, os.PathLike)):
        items = text_windows(data, tokenizer, seq_len)
    else:
        items = list(data)
    examples = []
    for index, item in enumerate(items):
        if isinstance(item, dict):
            ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
            labels = torch.as_tensor(item.get("labels", ids), dtype=torch.long)
        else:
            ids = torch.as_tensor(item, dtype=torch.long)
            labels = ids
        if ids.dim() != 1 or labels.shape != ids.shape:
            raise LLMOptConfigError(f"training example {index}: expected 1-D token ids (and labels of the same "
                                    f"length), got shape {tuple(ids.shape)}")
        if ids.numel() < 2:
            continue  # nothing to predict
        for start in range(0, ids.numel(), seq_len):
            window_ids, window_labels = ids[start:start + seq_len], labels[start:start + seq_len]
            if window_ids.numel() >= 2:
                examples.append((window_ids.clone(), window_labels.clone()))
    if not examples:
        raise LLMOptConfigError("the training data holds no sequence of at least 2 tokens")
    return examples


def pack(examples: Sequence[tuple[torch.Tensor, torch.Tensor]], seq_len: int) -> list[dict]:
    """Pack examples, in order, into rows of at most ``seq_len`` tokens (first fit
    in order: a document that does not fit starts a new row). Each row records the
    documents' boundaries; the first token of each document has label ``-100``
    so that no loss is taken across a boundary."""
    rows, current, length = [], [], 0
    for ids, labels in examples:
        if length + ids.numel() > seq_len and current:
            rows.append(current)
            current, length = [], 0
        current.append((ids, labels))
        length += ids.numel()
    if current:
        rows.append(current)
    packed = []
    for row in rows:
        ids = torch.cat([d[0] for d in row])
        labels = torch.cat([d[1] for d in row]).clone()
        positions = torch.cat([torch.arange(d[0].numel()) for d in row])
        documents = torch.cat([torch.full((d[0].numel(),), i) for i, d in enumerate(row)])
        labels[positions == 0] = IGNORE
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions, "document_ids": documents})
    return packed


def collate(rows: Sequence, pad_id: int = 0) -> dict:
    """Pad rows (examples or packed rows) on the right into one batch."""
    if isinstance(rows[0], dict):
        items = rows
    else:
        items = [{"input_ids": ids, "labels": labels} for ids, labels in rows]
    width = max(r["input_ids"].numel() for r in items)
    batch = {
        "input_ids": torch.full((len(items), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(items), width), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(items), width), dtype=torch.long),
    }
    packed = "position_ids" in items[0]
    if packed:
        batch["position_ids"] = torch.zeros((len(items), width), dtype=torch.long)
        batch["document_ids"] = torch.full((len(items), width), -1, dtype=torch.long)
    for i, r in enumerate(items):
        n = r["input_ids"].numel()
        batch["input_ids"][i, :n] = r["input_ids"]
        batch["labels"][i, :n] = r["labels"]
        batch["attention_mask"][i, :n] = 1
        if packed:
            batch["position_ids"][i, :n] = r["position_ids"]
            batch["document_ids"][i, :n] = r["document_ids"]
    return batch


def count_targets(batch: dict) -> int:
    """The number of positions the loss is taken at (HF shift: labels[:, 1:] != -100)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class Batches:
    """The rows of a dataset in a seeded per-epoch order, handed out a step at a time.

    The position (``epoch``, ``cursor``) is all the state there is: :meth:`state_dict`
    / :meth:`load_state_dict` resume the same sequence of batches.
    """

    def __init__(self, rows: Sequence, *, shuffle: bool, seed: int, pad_id: int = 0):
        if not rows:
            raise LLMOptConfigError("no training rows")
        self.rows, self.shuffle, self.seed, self.pad_id = rows, shuffle, seed, pad_id
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def take(self, count: int) -> list:
        """The next ``count`` rows (wrapping into the next epoch's order)."""
        taken = []
        while len(taken) < count:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            taken.append(self.rows[self._order[self.cursor]])
            self.cursor += 1
        return taken

    def step(self, micro_batch_size: int, grad_accum_steps: int, rank: int = 0, world_size: int = 1) -> list[dict]:
        """The micro-batches of this rank for one optimizer step: the step's rows are
        ``micro_batch_size * grad_accum_steps * world_size`` consecutive rows; rank ``r``
        takes the ``r``-th contiguous share, cut into ``grad_accum_steps`` micro-batches."""
        share = micro_batch_size * grad_accum_steps
        rows = self.take(share * world_size)[rank * share:(rank + 1) * share]
        return [collate(rows[i:i + micro_batch_size], self.pad_id) for i in range(0, share, micro_batch_size)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def eval_batches(rows: Sequence, batch_size: int, pad_id: int = 0) -> Iterator[dict]:
    for i in range(0, len(rows), batch_size):
        yield collate(rows[i:i + batch_size], pad_id)


def prepare_rows(data, *, tokenizer=None, seq_len: int, packing: bool) -> list:
    examples = as_examples(data, tokenizer=tokenizer, seq_len=seq_len)
    return pack(examples, seq_len) if packing else examples


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The ``(B, 1, T, T)`` boolean mask (True: may attend) of packed rows: causal
    within each document, nothing across documents. A padding position attends to
    itself only, so that no row of the mask is empty (an empty row is NaN in softmax)."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (same & causal) | torch.eye(length, dtype=torch.bool)
    return mask[:, None]
