"""train.py and sample.py end to end on a tiny model: memorisation, exact resume, benches, clean errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "To be, or not to be, that is the question.\n"
TEXT_IDS = [2514, 307, 11, 393, 407, 284, 307, 11, 326, 318, 262, 1808, 13, 198]  # GPT-2 BPE of TEXT
TINY = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--embed_dim=32", "--bottleneck_dim=32", "--block_size=14",
        "--batch_size=16", "--warmup_iters=20", "--eval_iters=1", "--sample_steps=4", "--num_eval_samples=1",
        "--log_interval=50"]


@pytest.fixture
def data_dir(tmp_path):
    """One sequence (plus end-of-text): with block_size = its length every window is the whole text."""
    folder = tmp_path / "data" / "one"
    folder.mkdir(parents=True)
    for split in ("train", "val"):
        np.array(TEXT_IDS + [50256], dtype=np.uint16).tofile(folder / f"{split}.bin")
    return str(tmp_path / "data")


def run_train(data_dir, out_dir, *extra):
    train.main(["--dataset=one", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *extra])
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


def test_tiny_model_memorises_text_and_sample_py_reproduces_it(data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    run_train(data_dir, out, "--max_iters=200", "--eval_interval=200")
    log = capsys.readouterr().out
    losses = [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if " loss " in line]
    assert losses[-1] < 0.1 * losses[0]
    samples = str(tmp_path / "samples.jsonl")
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--num_samples=3", f"--out={samples}"])
    texts = [json.loads(line)["text"] for line in open(samples)]
    assert texts == [TEXT] * 3
    assert "s per sample" in capsys.readouterr().out


def test_resume_continues_exactly(data_dir, tmp_path):
    whole = run_train(data_dir, tmp_path / "a", "--max_iters=6", "--eval_interval=3")
    run_train(data_dir, tmp_path / "b", "--max_iters=3", "--eval_interval=3")
    resumed = run_train(data_dir, tmp_path / "b", "--max_iters=6", "--eval_interval=3", "--resume")
    assert resumed["iter"] == whole["iter"] == 6
    for key in ("model", "ema"):
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    for a, b in zip(whole["optimizers"], resumed["optimizers"]):
        for sa, sb in zip(a["state"].values(), b["state"].values()):
            for k in sa:
                assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k]))


def test_learning_rate_schedules():
    tc = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert train.lr_at(0, tc) == pytest.approx(0.1) and train.lr_at(9, tc) == 1.0 and train.lr_at(100, tc) == 1.0
    tc.lr_schedule = "cosine"
    assert train.lr_at(60, tc) == pytest.approx(0.55) and train.lr_at(110, tc) == pytest.approx(0.1)


def test_config_overrides_and_presets():
    tc, mc = train.parse_args(["--preset=elf-b-owt", "--lr=1e-3", "--compile=false"])
    assert (tc.model, tc.batch_size, tc.grad_accum, tc.lr) == ("elf-b", 512, 8, 1e-3)
    assert (mc.n_layer, mc.n_embd, mc.block_size, mc.embed_dim) == (12, 768, 1024, 512)
    tc, mc = train.parse_args(["--n_layer=3", "--guidance=false", "--resume"])
    assert mc.n_layer == 3 and mc.guidance is False and tc.resume is True


@pytest.mark.parametrize("args, message", [
    (["--max_iter=5"], "did you mean --max_iters"),
    (["--max_iters=ten"], "--max_iters expects int"),
    (["--preset=huge"], "unknown preset"),
    (["--model=elf-xxl"], "unknown model"),
    (["--batch_size=10", "--grad_accum=3"], "not a multiple"),
])
def test_bad_config_is_a_clear_error(args, message):
    with pytest.raises(train.ConfigError, match=message):
        train.parse_args(args)


def test_bad_inputs_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(train.ConfigError, match="prepare_data.py"):
        train.main(["--dataset=nothing", f"--data_dir={data_dir}", f"--out_dir={tmp_path}/o", *TINY])
    with pytest.raises(train.ConfigError, match="lower --block_size"):
        train.main(["--dataset=one", f"--data_dir={data_dir}", f"--out_dir={tmp_path}/o", *TINY, "--block_size=64"])
    with pytest.raises(train.ConfigError, match="no checkpoint"):
        run_train(data_dir, tmp_path / "o", "--resume")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(train.ConfigError, match="not writable"):
        run_train(data_dir, blocker / "out")
    run_train(data_dir, tmp_path / "o", "--max_iters=2", "--eval_interval=2")
    with pytest.raises(train.ConfigError, match=r"n_layer \(checkpoint 2, requested 3\)"):
        run_train(data_dir, tmp_path / "o", "--resume", "--n_layer=3")
    (tmp_path / "o" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train.ConfigError, match="truncated or corrupt"):
        run_train(data_dir, tmp_path / "o", "--resume")


def test_sample_bad_inputs_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "missing.pt")])
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="not a compatible ELF checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "bad.pt")])
    run_train(data_dir, tmp_path / "o", "--max_iters=1", "--eval_interval=1")
    with pytest.raises(SystemExit, match="outside 1..14"):
        sample.main(["--ckpt", str(tmp_path / "o" / "ckpt.pt"), "--length=15"])


def cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_command_line_errors_are_one_line(tmp_path):
    for args in (["train.py", "--lr_warmup=5"], ["train.py", f"--data_dir={tmp_path}"],
                 ["sample.py", "--ckpt", str(tmp_path / "none.pt")]):
        result = cli(*args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_benches_print_one_json_line():
    result = cli("train.py", "--bench", "--model=elf-cpu", "--n_layer=1", "--batch_size=4", "--block_size=16",
                 "--bench_warmup=1", "--bench_steps=2")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["bench"] == "train" and stats["tokens_per_s"] > 0 and stats["step_s"] > 0
    result = cli("sample.py", "--bench", "--model=elf-cpu", "--batch_size=2", "--length=16", "--steps=2",
                 "--bench_batches=1", "--ckpt=none")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["bench"] == "sample" and stats["sequences_per_s"] > 0
