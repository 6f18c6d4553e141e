"""Data: packing (no attention across documents, positions restart), padding, text windows,
micro_batch_size="auto", precision."""

import pytest
import torch

from llmopt.errors import LLMOptConfigError
from llmopt.training import TrainConfig, Trainer
from llmopt.training.data import IGNORE, as_examples, collate, pack

from .helpers import capture_grads, sequences, tiny


def test_packing_gives_each_document_its_own_logits_in_fp64():
    docs = sequences(5, low=3, high=12, seed=4)
    model = tiny(torch.float64)
    trainer = Trainer(model, TrainConfig(compile=False, packing=True, seq_len=32, shuffle=False), docs)
    rows = trainer.train_rows
    assert len(rows) < len(docs)  # several documents share a row
    batch = collate(rows)
    with torch.no_grad():
        logits = trainer.forward(model, batch).logits
        alone = [model(d[None]).logits[0] for d in docs]
    index = 0
    for r, row in enumerate(rows):
        for doc in range(int(row["document_ids"].max()) + 1):
            where = (batch["document_ids"][r] == doc).nonzero().flatten()
            torch.testing.assert_close(logits[r, where], alone[index], atol=1e-10, rtol=0)
            assert batch["labels"][r, where[0]] == IGNORE and torch.equal(batch["position_ids"][r, where],
                                                                          torch.arange(where.numel()))
            index += 1
    assert index == len(docs)


def test_packed_and_padded_evaluation_agree_in_fp64():
    docs = sequences(6, low=3, high=20, seed=8)
    losses = []
    for packing in (False, True):
        trainer = Trainer(tiny(torch.float64), TrainConfig(compile=False, packing=packing, seq_len=40,
                                                           eval_batch_size=3), docs, eval_data=docs)
        losses.append(trainer.evaluate()["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-10)


def test_compiled_packed_forward_matches_eager():
    docs = sequences(4, low=3, high=12, seed=4)
    model = tiny()
    trainer = Trainer(model, TrainConfig(packing=True, seq_len=32, compile=True,
                                         compile_options={"lower": "eager"}), docs, eval_data=docs)
    batch = collate(trainer.train_rows)
    with torch.no_grad():
        compiled = trainer.forward(trainer.train_model, batch).logits
        eager = trainer.forward(model, batch).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_examples_windows_labels_and_text_path(tmp_path):
    long = torch.arange(25)
    examples = as_examples([long, [1, 2, 3], [7], {"input_ids": [4, 5, 6], "labels": [-100, 5, 6]}], seq_len=10)
    assert [e[0].numel() for e in examples] == [10, 10, 5, 3, 3]  # the 1-token sequence has no target
    assert examples[-1][1].tolist() == [-100, 5, 6]
    packed = pack(examples, 16)
    assert [int(r["input_ids"].numel()) for r in packed] == [10, 15, 6]

    class Chars:  # a character tokenizer: enough to check the text path
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 255 + 1 for c in text]}

    (tmp_path / "a.txt").write_text("hello world, " * 10)
    (tmp_path / "b.txt").write_text("second file")
    examples = as_examples(tmp_path, tokenizer=Chars(), seq_len=50)
    assert sum(e[0].numel() for e in examples) == 130 + 1 + 11 + 1
    with pytest.raises(LLMOptConfigError, match="needs a tokenizer"):
        as_examples(tmp_path / "a.txt", seq_len=8)


def test_padding_is_per_micro_batch():
    seqs = [torch.arange(1, 4), torch.arange(1, 9), torch.arange(1, 3), torch.arange(1, 6)]
    trainer = Trainer(tiny(), TrainConfig(compile=False, shuffle=False, micro_batch_size=2, grad_accum_steps=2), seqs)
    first, second = trainer.batches.step(2, 2)
    assert first["input_ids"].shape == (2, 8) and second["input_ids"].shape == (2, 5)
    assert first["attention_mask"].sum() == 11 and (first["labels"] == IGNORE).sum() == 5


def test_auto_micro_batch_size_picks_the_largest_that_fits():
    seqs = sequences(64, low=40, high=41)
    probe = Trainer(tiny(), TrainConfig(compile=False, micro_batch_size="auto", memory_budget_bytes=10**12,
                                        max_steps=1, max_micro_batch_size=64), seqs)
    probe.train()
    measured = probe.auto_memory
    assert measured["chosen"] == 64 and measured["per_row"] > 0
    budget = measured["fixed"] + measured["base"] + int(measured["per_row"] * 5.5)
    trainer = Trainer(tiny(), TrainConfig(compile=False, micro_batch_size="auto", memory_budget_bytes=budget,
                                          max_steps=1), seqs)
    assert trainer.train().micro_batch_size == 4
    with pytest.raises(LLMOptConfigError, match="not even 1 sequence fits"):
        Trainer(tiny(), TrainConfig(compile=False, micro_batch_size="auto", memory_budget_bytes=1000), seqs).train()


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_keeps_fp32_master_weights(precision, dtype):
    data = sequences(8, seed=6)
    results, seen = {}, []
    for p in ("fp32", precision):
        model = tiny()
        trainer = Trainer(model, TrainConfig(max_steps=2, micro_batch_size=4, lr=1e-3, compile=False, precision=p,
                                             shuffle=False), data)
        if p != "fp32":
            model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        results[p] = trainer.train().losses
        assert all(param.dtype == torch.float32 for param in model.parameters())
    assert seen and set(seen) == {dtype}
    assert results[precision] == pytest.approx(results["fp32"], rel=2e-2)


def test_the_padding_mask_goes_in_only_where_something_is_padded():
    trainer = Trainer(tiny(), TrainConfig(compile=False, shuffle=False), sequences(4, 9, 10))
    assert "attention_mask" not in trainer.model_inputs(collate(trainer.train_rows[:2]))
    padded = Trainer(tiny(), TrainConfig(compile=False, shuffle=False), sequences(4, 5, 12, seed=3))
    inputs = padded.model_inputs(collate(padded.train_rows[:4]))
    assert not bool(inputs["attention_mask"].all())


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflowed():
    """The gradient scaler: an overflowing step leaves the weights alone and halves the
    scale; the next step's gradients reach the optimizer unscaled: they equal the fp32
    step's to fp16 accuracy (relative norm 1e-2: unit roundoff 2^-11 over a few layers,
    measured 1-2.4e-3), where the still-scaled ones would be 2^15 times too large."""
    data = sequences(4, seed=2)
    config = dict(max_steps=2, micro_batch_size=4, lr=1e-3, compile=False, shuffle=False, max_grad_norm=None,
                  schedule="constant")
    model = tiny()
    trainer = Trainer(model, TrainConfig(precision="fp16", **config), data)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0 ** 16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = model.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    trainer.train_step()
    handle.remove()
    for name, p in model.named_parameters():  # no update (fused AdamW is called, and skips it)
        assert torch.equal(p, before[name]), name
    assert trainer.scaler.get_scale() == 2.0 ** 15
    seen = capture_grads(trainer)
    trainer.train_step()  # the same 4 rows: every step's batch
    assert trainer.scaler.get_scale() == 2.0 ** 15
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())

    reference = Trainer(tiny(), TrainConfig(precision="fp32", **config), data)
    reference.model.load_state_dict(before)
    assert not reference.scaler.is_enabled()
    expected = capture_grads(reference)
    reference.train_step()
    for name, g in expected[0].items():
        error = float((seen[0][name] - g).norm() / g.norm())
        assert error < 1e-2, (name, error)
