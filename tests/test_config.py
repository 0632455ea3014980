"""train.py's configuration: every value checked where it is parsed (one line naming the fix),
--help from the dataclasses' own comments, and a log.jsonl that survives a crash and --resume."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, fields

import pytest
import torch

import train
from elf import MODEL_SIZES, ELFConfig, draw_training_noise
from helpers import flags, random_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--embed_dim=16", "--bottleneck_dim=16",
        "--block_size=8", "--batch_size=4", "--warmup_iters=2", "--eval_iters=1",
        "--sample_steps=2", "--num_eval_samples=1", "--log_interval=1", "--eval_interval=2"]


@pytest.mark.parametrize("args, message", [
    # sizes, counts and intervals: integers > 0 (or >= 0), seeds in range, GPT-2's vocabulary
    (["--batch_size=0"], r"--batch_size must be an integer > 0, got 0"),
    (["--grad_accum=0"], r"--grad_accum must be an integer > 0"),
    (["--eval_interval=0"], r"--eval_interval must be an integer > 0"),
    (["--log_interval=-3"], r"--log_interval must be an integer > 0, got -3"),
    (["--n_layer=0"], r"--n_layer must be an integer > 0"),
    (["--bench_steps=0"], r"--bench_steps must be an integer > 0"),
    (["--warmup_iters=-1"], r"--warmup_iters must be an integer >= 0"),
    (["--seed=-1"], r"--seed must be an integer in \[0, 2\*\*31\)"),
    (["--embedding_seed=2147483648"], r"--embedding_seed must be an integer in"),
    (["--vocab_size=1000"], r"--vocab_size must be at least GPT-2's 50257 tokens"),
    # rates and scales: finite, positive or non-negative
    (["--lr=nan"], r"--lr must be finite and > 0, got nan"),
    (["--lr=0"], r"--lr must be finite and > 0"),
    (["--grad_clip=inf"], r"--grad_clip must be finite and > 0, got inf"),
    (["--noise_scale=-1"], r"--noise_scale must be finite and > 0"),
    (["--t_eps=0"], r"--t_eps must be finite and > 0"),
    (["--grad_clip=-0.1"], r"--grad_clip must be finite and > 0"),
    (["--t_std=inf"], r"--t_std must be finite and >= 0"),
    (["--t_mean=nan"], r"--t_mean must be finite, got nan"),
    # probabilities
    (["--decoder_prob=1.5"], r"--decoder_prob must be a probability, in \[0, 1\], got 1.5"),
    (["--ema_decay=-0.1"], r"--ema_decay must be a probability"),
    (["--dropout=nan"], r"--dropout must be a probability"),
    (["--cond_drop_prob=2"], r"--cond_drop_prob must be a probability"),
    # choices and strings
    (["--optimizer=sgd"], r"--optimizer must be one of muon, adamw, got 'sgd'"),
    (["--lr_schedule=linear"], r"--lr_schedule must be one of constant, cosine"),
    (["--dtype=bf16"], r"--dtype must be one of auto, float32, bfloat16"),
    (["--compile=yes"], r"--compile must be one of auto, true, false"),
    (["--embedding=onehot"], r"--embedding must be one of gaussian, learned"),
    (["--prediction=eps"], r"--prediction must be one of x, v"),
    (["--model=elf-xxl"], r"--model must be one of elf-b, elf-m, elf-l, elf-cpu"),
    (["--out_dir="], r"--out_dir must be non-empty"),
    # how the samples at each evaluation (and sample.py's, by default) are drawn
    (["--sampler=euler"], r"--sampler must be one of sde, ode, got 'euler'"),
    (["--sample_schedule=cos"], r"--sample_schedule must be one of logit_normal, uniform"),
    (["--sample_gamma=-1"], r"--sample_gamma must be finite and >= 0"),
    (["--sample_scale=inf"], r"--sample_scale must be finite and >= 0, got inf"),
    # rules that tie fields together
    (["--batch_size=10", "--grad_accum=3"], r"batch_size 10 is not a multiple of grad_accum 3"),
    (["--n_head=5"], r"n_embd 192 is not 5 heads of even size: --n_head can be 1, 2, 3, 4, 6, 8,"),
    (["--n_head=64"], r"n_embd 192 is not 64 heads of even size"),       # head size 3: odd
    (["--n_embd=191", "--n_head=1"], r"--n_head can be none: it is odd"),
    (["--lr=1", "--lr=2"], r"--lr is given twice: keep one"),
    (["--cond_prefix_prob=0.6", "--cond_span_prob=0.5"], r"cond_prefix_prob \+ cond_span_prob"),
    (["--guidance_min=6"], r"guidance_min must be <= guidance_max"),
    (["--lr_schedule=cosine", "--min_lr=0.1"], r"min_lr must be <= lr"),
])
def test_each_kind_of_bad_value_is_a_one_line_error(args, message):
    with pytest.raises(train.RunError, match=message) as error:
        train.parse_args(args)
    assert "\n" not in str(error.value)


def test_every_field_has_a_rule_and_the_shipped_settings_follow_them():
    names = [f.name for config in (train.TrainConfig, ELFConfig) for f in fields(config)]
    assert sorted(train.RULE_OF) == sorted(names)
    for preset in train.PRESETS:
        for model in MODEL_SIZES:
            train.parse_args([f"--preset={preset}", f"--model={model}"])


@pytest.mark.parametrize("args", [
    ["--warmup_iters=0", "--decoder_prob=0", "--self_cond_prob=1", "--ema_decay=1", "--t_mean=-3"],
    ["--lr_schedule=cosine", "--min_lr=0.002", "--cond_prefix_prob=0.5", "--cond_span_prob=0.5"],
    ["--device=cpu", "--dtype=float32", "--compile=false", "--guidance_min=2", "--guidance_max=2"],
    ["--device=cuda:1", "--optimizer=adamw", "--prediction=v", "--embedding=learned", "--n_head=4"],
])
def test_values_at_the_edges_are_accepted(args):
    train.parse_args(args)


def test_the_quick_start_trains_on_noisier_times_and_the_paper_recipe_keeps_its_own():
    _, quick = train.parse_args([])
    _, paper = train.parse_args(["--preset=elf-b-owt"])
    assert (quick.t_mean, paper.t_mean) == (-1.9, -1.5)
    g = torch.Generator().manual_seed(0)
    draws = draw_training_noise(quick, 4000, 2, g, g)
    median = draws.t[:4000 - draws.n_decode].median().item()             # the denoise rows' times
    assert median == pytest.approx(1 / (1 + math.exp(1.9)), abs=0.01)       # 0.13, not 0.18


@pytest.mark.parametrize("device", ["cuda:99", "gpu", "cpu:x"])
def test_a_device_that_is_not_there_is_a_clear_error(device):
    tc, _ = train.parse_args([f"--device={device}"])
    with pytest.raises(SystemExit, match=f"^error: no device {device} here: use --device=auto"):
        train.init_distributed(tc)         # the device choice of sample.py too: one function
    assert train.init_distributed(train.parse_args(["--device=auto"])[0])[2].type == "cpu"


def cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_issues_examples_end_in_one_line_not_a_traceback():
    for args in (["--batch_size=0"], ["--n_head=5"], ["--lr=nan"]):
        result = cli(*args)
        assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_shows_what_python_train_py_uses_beside_the_papers_recipe(capsys):
    train.main(["--help"])
    text = capsys.readouterr().out
    quick = {k: v for c in train.parse_args([]) for k, v in asdict(c).items()}
    paper = {k: v for c in train.parse_args(["--preset=elf-b-owt"]) for k, v in asdict(c).items()}
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  --")}
    for config in (train.TrainConfig, ELFConfig):
        for f in fields(config):
            if f.name != "init_from":                                  # empty in both columns
                assert rows[f"--{f.name}"][1:3] == [str(quick[f.name]), str(paper[f.name])]
    # the issue's example: --help listed ELF-B's sizes while python train.py used the quick start's
    assert rows["--block_size"][1:3] == ["64", "1024"] and rows["--n_layer"][1:3] == ["3", "12"]
    assert rows["--t_mean"][1:3] == ["-1.9", "-1.5"]
    lines = text.splitlines()
    assert any(line.startswith("  --lr_schedule") and "'cosine' (decays" in line for line in lines)
    assert any(line.startswith("  --noise_scale") and "sigma: z_t" in line for line in lines)
    assert "# optimisation (README: Training objective)" in text
    assert max(map(len, lines)) <= 100
    result = cli("-h")
    assert result.returncode == 0 and result.stdout.strip() == text.strip() and not result.stderr


# ----------------------------------------------------------------------------------------------
# The log across a crash: entries past the checkpoint and a torn last line.

@pytest.fixture
def data_dir(tmp_path):
    return str(random_dataset(tmp_path / "data" / "rand").parent)


def run(data_dir, out, *extra):
    train.main(flags("--dataset=rand", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, *extra))


def test_resume_rewrites_the_log_from_the_checkpoint_dropping_a_dead_runs_rows(data_dir, tmp_path,
                                                                              capsys):
    run(data_dir, tmp_path, "--max_iters=4")
    log_path = tmp_path / "log.jsonl"
    clean = log_path.read_text()
    rows = [json.loads(line) for line in clean.splitlines()]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["log"] == rows  # it travels along
    # What a SIGKILL after the checkpoint of iteration 4 leaves: rows past it, and a torn line.
    dead = ['{"iter": 5, "loss": 1.0}', '{"iter": 6, "loss": 1.0}', '{"iter": 6, "val": 1.0}']
    with open(log_path, "a") as f:
        f.write("\n".join(dead) + '\n{"iter": 7, "lo')
    capsys.readouterr()
    run(data_dir, tmp_path, "--max_iters=6", "--resume")
    assert f"at iteration 4, {len(rows)} log rows" in capsys.readouterr().out
    text = log_path.read_text()
    assert text.startswith(clean) and text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["iter"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in rows if "val" in r] == [2, 4, 6]
    assert all(r["loss"] != 1.0 for r in rows if "loss" in r)       # the dead run's rows are gone


def test_config_printed_once_and_a_finished_or_replaced_run_is_said(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path, "--max_iters=2")
    out = capsys.readouterr().out
    assert out.count("config (what differs from python train.py's, --help's first column): ") == 1
    assert "max_iters=2" in out and "n_layer=1" in out and " grad_clip=" not in out  # a default
    with pytest.raises(train.RunError, match="at iteration 2, not before --max_iters=2: raise"):
        run(data_dir, tmp_path, "--max_iters=2", "--resume")
    run(data_dir, tmp_path, "--max_iters=1")                      # a new run in the same out_dir
    out = capsys.readouterr().out
    assert "ckpt.pt will be replaced by this new run's (--resume continues it instead)" in out
