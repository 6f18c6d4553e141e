"""The Trainer's loss normalisation, penalties, decay, dropout, schedule, early stopping,
checkpoints and resume, each against a reference computed another way."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmopt.errors import LLMOptConfigError
from llmopt.training import TrainConfig, Trainer
from llmopt.training.optim import lr_at

from .helpers import capture_grads, sequences, tiny

EAGER = dict(compile=False, shuffle=False, max_grad_norm=None)


def _reference_mean_loss(model, seqs):
    """Mean per-token CE over all targets of all sequences, one sequence per forward."""
    total, count = 0.0, 0
    for ids in seqs:
        logits = model(ids[None]).logits[0, :-1]
        total = total + F.cross_entropy(logits, ids[1:], reduction="sum")
        count += ids.numel() - 1
    return total / count


def test_accumulation_matches_one_batch_in_fp64():
    """4 micro-batches of 2 padded variable-length sequences == 1 batch of 8 == the
    token-weighted mean over all 8 sequences, to 1e-10; a mean of micro-batch means is not."""
    seqs = sequences(8, low=3, high=40, seed=1)
    grads, params = {}, {}
    for name, micro, accum in (("accumulated", 2, 4), ("one batch", 8, 1)):
        model = tiny(torch.float64)
        trainer = Trainer(model, TrainConfig(max_steps=1, micro_batch_size=micro, grad_accum_steps=accum,
                                             lr=1e-2, optimizer="lion", **EAGER), seqs)
        seen = capture_grads(trainer)
        trainer.train()
        grads[name], params[name] = seen[0], {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = tiny(torch.float64)
    loss = _reference_mean_loss(reference, seqs)
    loss.backward()
    for n, p in reference.named_parameters():
        torch.testing.assert_close(grads["accumulated"][n], p.grad, atol=1e-10, rtol=0, msg=n)
        torch.testing.assert_close(grads["one batch"][n], p.grad, atol=1e-10, rtol=0, msg=n)
        torch.testing.assert_close(params["accumulated"][n], params["one batch"][n], atol=1e-10, rtol=0)
    # the pitfall: the mean of the 4 micro-batch means weighs short sequences up
    reference.zero_grad()
    pitfall = sum(_reference_mean_loss(reference, seqs[i:i + 2]) for i in range(0, 8, 2)) / 4
    assert abs(float(pitfall.detach()) - float(loss.detach())) > 1e-3


def _one_step_grads(dtype=torch.float64, **options):
    model = tiny(dtype)
    trainer = Trainer(model, TrainConfig(max_steps=1, micro_batch_size=2, grad_accum_steps=2, lr=0.0,
                                         optimizer="lion", **EAGER, **options), sequences(4))
    seen = capture_grads(trainer)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return seen[0], start


def test_l1_and_l2_penalty_gradients_equal_their_closed_forms():
    plain, start = _one_step_grads()
    l1, _ = _one_step_grads(l1_penalty=0.03, l1_params=("*mlp*",))
    l2, _ = _one_step_grads(l2_penalty=0.05, l2_params=("*self_attn.q_proj*", "lm_head.weight"))
    for name, p in start.items():
        expected_l1 = 0.03 * torch.sign(p) if "mlp" in name else torch.zeros_like(p)
        torch.testing.assert_close(l1[name] - plain[name], expected_l1, atol=1e-10, rtol=0, msg=name)
        expected_l2 = 0.05 * p if ("q_proj" in name or name == "lm_head.weight") else torch.zeros_like(p)
        torch.testing.assert_close(l2[name] - plain[name], expected_l2, atol=1e-10, rtol=0, msg=name)


def test_weight_decay_is_decoupled_and_skips_norms():
    """AdamW's weight_decay leaves the gradient alone and shrinks p by lr * wd * p
    (not the norms); an L2 penalty would change the gradient instead."""
    runs = {}
    for wd in (0.0, 0.1):
        model = tiny(torch.float64)
        trainer = Trainer(model, TrainConfig(max_steps=1, micro_batch_size=2, lr=1e-2, weight_decay=wd,
                                             schedule="constant", **EAGER), sequences(2))
        seen = capture_grads(trainer)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
        runs[wd] = (seen[0], {n: p.detach().clone() for n, p in model.named_parameters()})
    for name, p0 in start.items():
        torch.testing.assert_close(runs[0.1][0][name], runs[0.0][0][name], atol=0, rtol=0)
        decay = 0.0 if "norm" in name else 1e-2 * 0.1
        torch.testing.assert_close(runs[0.1][1][name] - runs[0.0][1][name], -decay * p0, atol=1e-12, rtol=0,
                                   msg=name)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()` before")
@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_follows_the_closed_form(schedule):
    lr, min_lr, warmup, steps = 1e-3, 1e-4, 3, 10
    model = tiny()
    trainer = Trainer(model, TrainConfig(max_steps=steps, micro_batch_size=2, lr=lr, min_lr=min_lr,
                                         warmup_steps=warmup, schedule=schedule, **EAGER), sequences(4))
    got = []
    for _ in range(steps):
        got.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    for step, value in enumerate(got):
        if step < warmup:
            expected = lr * (step + 1) / warmup
        else:
            t = (step - warmup) / (steps - warmup)
            expected = {"cosine": min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2,
                        "linear": lr + (min_lr - lr) * t, "constant": lr}[schedule]
        assert value == pytest.approx(expected, rel=1e-12), (step, value, expected)
        assert lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup, max_steps=steps,
                     schedule=schedule) == pytest.approx(expected, rel=1e-12)
    assert got[warmup - 1] == pytest.approx(lr)


def test_gradient_clipping_by_global_norm():
    seen_plain, _ = _one_step_grads()
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in seen_plain.values()]))
    model = tiny(torch.float64)
    trainer = Trainer(model, TrainConfig(max_steps=1, micro_batch_size=2, grad_accum_steps=2, lr=0.0,
                                         optimizer="lion", compile=False, shuffle=False,
                                         max_grad_norm=float(norm) / 4), sequences(4))
    seen = capture_grads(trainer)
    result = trainer.train()
    assert result.steps[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-9)
    for name, g in seen_plain.items():
        torch.testing.assert_close(seen[0][name], g / 4, atol=1e-9, rtol=1e-6)


def test_dropout_is_set_where_the_model_has_it():
    model = tiny()
    Trainer(model, TrainConfig(max_steps=1, micro_batch_size=2, attention_dropout=0.25, **EAGER), sequences(2))
    assert model.config.attention_dropout == 0.25
    assert {layer.self_attn.attention_dropout for layer in model.model.layers} == {0.25}
    with pytest.raises(LLMOptConfigError, match="has no residual dropout"):
        Trainer(tiny(), TrainConfig(residual_dropout=0.1, **EAGER), sequences(2))
    from llmopt.models.random_models import random_hf_model

    gpt2 = random_hf_model("gpt2")
    Trainer(gpt2, TrainConfig(residual_dropout=0.1, embedding_dropout=0.2, attention_dropout=0.3, **EAGER),
            sequences(2))
    assert gpt2.transformer.drop.p == 0.2
    assert {b.attn.resid_dropout.p for b in gpt2.transformer.h} == {0.1}
    assert {b.attn.attn_dropout.p for b in gpt2.transformer.h} == {0.3}


@pytest.mark.parametrize("options, message", [
    (dict(optimizer="sgd"), "train option 'optimizer' got 'sgd'; valid choices are 'adamw', 'lion'"),
    (dict(recompute="some"), "valid choices are 'none', 'full', 'selective'"),
    (dict(recompute=1.5), "budget must be in"),
    (dict(recompute=0.5, compile=False), "needs compile=True"),
    (dict(precision="fp8"), "'precision' got 'fp8'"),
    (dict(micro_batch_size=0), "positive integer or 'auto'"),
    (dict(min_lr=1.0, lr=0.1), "exceeds"),
    (dict(schedule="step"), "'schedule' got 'step'"),
])
def test_config_refuses_bad_options(options, message):
    with pytest.raises(LLMOptConfigError, match=message):
        TrainConfig(**options)
    with pytest.raises(LLMOptConfigError, match="unknown train option 'lr_max'"):
        TrainConfig.from_dict({"lr_max": 1})


class _ScriptedEval(Trainer):
    """Evaluation losses from a script, so early stopping's bookkeeping is checked exactly."""

    def __init__(self, *args, script, **kwargs):
        super().__init__(*args, **kwargs)
        self.script, self.states = list(script), {}
        self.callbacks.append(lambda trainer, record: self.states.__setitem__(
            record["step"], {k: v.clone() for k, v in trainer.model.state_dict().items()}))

    def evaluate(self, data=None):
        loss = self.script.pop(0)
        return {"loss": loss, "perplexity": math.exp(loss)}


@pytest.mark.parametrize("output_dir", [False, True])
def test_early_stopping_restores_the_best_weights(tmp_path, output_dir):
    config = TrainConfig(max_steps=20, micro_batch_size=2, lr=1e-2, eval_every=1, patience=2, min_delta=0.05,
                         output_dir=str(tmp_path) if output_dir else None, **EAGER)
    model = tiny()
    # step 3 is the best; step 4 improves by less than min_delta; steps 4 and 5 make patience run out
    trainer = _ScriptedEval(model, config, sequences(8), eval_data=sequences(2), script=[3.0, 2.5, 2.0, 1.97, 2.2])
    result = trainer.train()
    assert result.stopped_early and len(result.steps) == 5
    assert result.best_step == 3 and result.best_eval_loss == 2.0
    for name, value in model.state_dict().items():
        assert torch.equal(value, trainer.states[3][name]), name
    assert not torch.equal(trainer.states[5]["lm_head.weight"], trainer.states[3]["lm_head.weight"])
    if output_dir:
        assert (tmp_path / "best" / "model.safetensors").exists() and (tmp_path / "loss.png").exists()
        assert (tmp_path / "log.jsonl").read_text().count('"event": "eval"') == 5


def test_evaluate_matches_the_reference_loss():
    model = tiny(torch.float64)
    data = sequences(5, seed=3)
    trainer = Trainer(model, TrainConfig(eval_batch_size=2, **EAGER), sequences(2), eval_data=data)
    got = trainer.evaluate()
    with torch.no_grad():
        expected = float(_reference_mean_loss(model, data))
    assert got["loss"] == pytest.approx(expected, abs=1e-10)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-10)


class _Interrupt(Exception):
    pass


def test_resume_continues_bit_for_bit(tmp_path):
    """Dropout, shuffling, warm-up + cosine, accumulation: 3 steps, a checkpoint, 3 more
    in a fresh Trainer give the same losses and weights as 6 steps in one go."""
    options = dict(max_steps=6, micro_batch_size=2, grad_accum_steps=2, lr=3e-3, warmup_steps=2, compile=False,
                   attention_dropout=0.3, weight_decay=0.01, seed=7)
    data = sequences(10, seed=5)
    straight = tiny()
    expected = Trainer(straight, TrainConfig(**options), data).train()

    def stop_after_three(trainer, record):
        if record["step"] == 4:
            raise _Interrupt

    first = Trainer(tiny(), TrainConfig(**options, output_dir=str(tmp_path), save_every=3), data,
                    callbacks=[stop_after_three])
    with pytest.raises(_Interrupt):
        first.train()
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts in
    resumed_model = tiny()
    resumed = Trainer(resumed_model, TrainConfig(**options), data).train(resume_from=tmp_path / "last")
    assert resumed.losses == expected.losses
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name


def test_compiled_training_matches_eager():
    data = sequences(8, low=20, high=21, seed=2)  # one length: one compiled graph
    results = []
    for compile_ in (False, True):
        options = dict(max_steps=2, micro_batch_size=4, lr=1e-3, compile=compile_, shuffle=False,
                       compile_options={"lower": "eager"})
        results.append(Trainer(tiny(), TrainConfig(**options), data).train().losses)
    import llmopt

    assert llmopt.last_report().count("attention") == 2  # the compiled run trained through llmopt::attention
    # rows without padding go in without a mask: the model's shape-only mask is proven causal
    assert all(r.detail.endswith("(constant mask proven causal)") for r in llmopt.last_report().rewrites("attention"))
    assert results[0] == pytest.approx(results[1], rel=1e-5)
