"""distill() / DistillTrainer: the loss it trains on, the frozen teacher, vocab checks, pruned zeros."""

import copy

import pytest
import torch
import torch.nn.functional as F

from llmopt.errors import LLMOptConfigError
from llmopt.models import random_llama
from llmopt.pruning import PruneConfig, prune_model
from llmopt.training import TrainConfig
from llmopt.training.distill import DistillConfig, DistillTrainer, distill, freeze_pruned_zeros


def _data(count=8, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(4, length + 1, (1,), generator=g)),), generator=g)
            for _ in range(count)]


def _config(**overrides):
    return TrainConfig(**{"max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "compile": False, "seed": 0,
                          "shuffle": False, "max_grad_norm": None, **overrides})


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_compute_loss_is_the_documented_mix(loss):
    student = random_llama(seed=1).double()
    teacher = random_llama(seed=2, num_layers=3).double()
    settings = DistillConfig(loss=loss, temperature=2.0, ce_weight=0.3, chunk_size=5)
    trainer = DistillTrainer(student, teacher, _config(), _data(), distill_config=settings)
    batch = trainer.batches.step(4, 1)[0]
    got, count = trainer.compute_loss(student, batch)

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    s_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = labels[:, 1:] != -100
    ce = F.cross_entropy(s_logits[keep], labels[:, 1:][keep], reduction="sum")
    p_s, p_t = torch.softmax(s_logits[keep] / 2, -1), torch.softmax(t_logits[keep] / 2, -1)
    kl = {"forward_kl": lambda: (p_t * (p_t / p_s).log()).sum(),
          "reverse_kl": lambda: (p_s * (p_s / p_t).log()).sum(),
          "jsd": lambda: 0.5 * (p_t * (2 * p_t / (p_t + p_s)).log()).sum()
          + 0.5 * (p_s * (2 * p_s / (p_t + p_s)).log()).sum()}[loss]()
    assert count == int(keep.sum())
    torch.testing.assert_close(got, 0.3 * ce + 0.7 * 4.0 * kl, rtol=1e-10, atol=1e-10)


def test_teacher_stays_frozen_and_the_student_moves_towards_it():
    student = random_llama(seed=1)
    teacher = random_llama(seed=2)
    before = copy.deepcopy(teacher.state_dict())
    probe = torch.stack([torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(i)) for i in range(4)])

    def kl_to_teacher():
        with torch.no_grad():
            p_t = torch.log_softmax(teacher(probe).logits, -1)
            p_s = torch.log_softmax(student(probe).logits, -1)
        return F.kl_div(p_s, p_t, log_target=True, reduction="batchmean").item()

    start = kl_to_teacher()
    result = distill(student, teacher, _data(16), DistillConfig(loss="forward_kl", ce_weight=0.0),
                     train_config=_config(max_steps=10, lr=1e-2))
    assert len(result.steps) == 10
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert kl_to_teacher() < 0.7 * start


def test_different_vocabularies_are_refused():
    with pytest.raises(LLMOptConfigError, match="vocabulary"):
        DistillTrainer(random_llama(), random_llama(vocab_size=300), _config(), _data())


def test_pruned_zeros_stay_zero_through_training():
    student = prune_model(random_llama(seed=1), PruneConfig(pattern="2:4"))
    zeros = {n: (m.weight == 0).clone() for n, m in student.named_modules()
             if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    dense = {n: w.clone() for n, w in student.state_dict().items()}
    handles = freeze_pruned_zeros(student)
    assert len(handles) == len(zeros)
    distill(student, random_llama(seed=2), _data(), DistillConfig(), train_config=_config(weight_decay=0.1))
    for name, module in student.named_modules():
        if name in zeros:
            assert (module.weight[zeros[name]] == 0).all(), name
            assert not torch.equal(module.weight, dense[f"{name}.weight"]), name  # the kept weights trained


def test_distill_command(tmp_path, capsys):
    from llmopt.cli import main

    text = tmp_path / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    out = tmp_path / "out"
    common = ["distill", "--random-model", "--train", str(text), "--output-dir", str(out), "--no-compile",
              "--no-progress", "--seq-len", "64", "--micro-batch-size", "4"]
    assert main([*common, "--prune", "2:4", "--max-steps", "2", "--loss", "jsd", "--eval", str(text)]) == 0
    printed = capsys.readouterr().out
    assert "steps: 2" in printed and "(jsd, T=1, ce_weight=0.5)" in printed and "held-out perplexity" in printed
    assert (out / "last" / "model.safetensors").is_file()
    assert main([*common, "--ce-weight", "1.5"]) == 2
    assert "'ce_weight' must be a number in [0, 1]" in capsys.readouterr().err
