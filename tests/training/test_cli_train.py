"""``llmopt train``: flags and a config file, the run's files, resume, clear errors."""

import json

from llmopt.cli import main


def _text(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    return path


def test_train_command_writes_log_plot_checkpoints_and_resumes(tmp_path, capsys):
    text, out = _text(tmp_path), tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"max_steps": 2, "micro_batch_size": 2, "seq_len": 64, "lr": 1e-3}))
    args = ["train", "--random-model", "--train", str(text), "--eval", str(text), "--output-dir", str(out),
            "--config", str(config), "--eval-every", "1", "--no-compile", "--no-progress"]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert len(result["steps"]) == 2 and result["config"]["lr"] == 1e-3 and result["config"]["eval_every"] == 1
    assert (out / "loss.png").stat().st_size > 0 and (out / "last" / "model.safetensors").exists()
    assert [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()] == [
        "step", "eval", "step", "eval", "end"]
    assert "eval at step 2" in capsys.readouterr().out
    # two more steps from the checkpoint: the history goes on from step 2
    assert main(args + ["--max-steps", "4", "--resume", str(out / "last")]) == 0
    assert [s["step"] for s in json.loads((out / "result.json").read_text())["steps"]] == [1, 2, 3, 4]


def test_train_command_reports_bad_options_in_one_line(tmp_path, capsys):
    args = ["train", "--random-model", "--train", str(_text(tmp_path)), "--output-dir", str(tmp_path / "o"),
            "--no-compile", "--recompute", "0.5"]
    assert main(args) == 2
    assert "needs compile=True" in capsys.readouterr().err
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"learning_rate": 1}))
    assert main(args[:-2] + ["--config", str(config)]) == 2
    assert "unknown train option 'learning_rate'" in capsys.readouterr().err
