"""train.py and sample.py end to end on a tiny model: memorisation, exact resume, benches, clean
errors."""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import elf
import sample
import train
from helpers import flags, random_dataset, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "To be, or not to be, that is the question.\n"
TEXT_IDS = [2514, 307, 11, 393, 407, 284, 307, 11, 326, 318, 262, 1808, 13, 198]  # its GPT-2 BPE
TINY = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--embed_dim=32", "--bottleneck_dim=32",
        "--block_size=14", "--batch_size=16", "--warmup_iters=20", "--eval_iters=1",
        "--sample_steps=4", "--num_eval_samples=1", "--log_interval=50",
        "--dtype=float32",      # the same numbers on every CPU ('auto': bf16 where it is fast)
        # the paper's recipe, not the cpu preset's (no self-conditioning, cosine decay, t_mean,
        # prompts and blanks, Muon's own rate)
        "--self_cond_prob=0.5", "--lr_schedule=constant", "--t_mean=-1.5", "--muon_lr=0",
        "--cond_prefix_prob=0", "--cond_span_prob=0"]


@pytest.fixture
def data_dir(tmp_path):
    """One sequence and end-of-text: with block_size its length, every window is the whole text."""
    folder = tmp_path / "data" / "one"
    folder.mkdir(parents=True)
    for shard in ("one_train_000001.bin", "one_val_000000.bin"):
        write_shard(folder / shard, TEXT_IDS + [50256])
    return str(tmp_path / "data")


def run_train(data_dir, out_dir, *extra):
    train.main(flags("--dataset=one", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY,
                     *extra))
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


def test_tiny_model_memorises_text_and_sample_py_reproduces_it(data_dir, tmp_path, capsys,
                                                               monkeypatch):
    out = str(tmp_path / "out")
    ckpt = run_train(data_dir, out, "--max_iters=200", "--eval_interval=200")
    ids = sorted(set(TEXT_IDS + [50256]))           # the decode head scores the data's ids only
    assert ckpt["model_config"]["decode_vocab"] == len(ids)
    assert ckpt["model"]["decode_ids"].tolist() == ids
    log = capsys.readouterr().out
    losses = [float(line.split("loss ")[1].split()[0])
              for line in log.splitlines() if " loss " in line]
    assert losses[-1] < 0.1 * losses[0]
    samples = str(tmp_path / "samples.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                  # no judge weights: entropy only
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--num_samples=3", f"--out={samples}",
                 "--eval", "--judge=surely-not-a-model"])
    texts = [json.loads(line)["text"] for line in open(samples)]
    assert texts == [TEXT] * 3
    assert "s per sample" in capsys.readouterr().out
    summary = json.loads(open(os.path.join(out, "results.jsonl")).read().splitlines()[-1])
    assert summary["entropy"] == pytest.approx(sample.unigram_entropy(TEXT_IDS), abs=1e-4)
    assert summary["n"] == 3 and summary["steps"] == 4 and summary["s_per_sample"] > 0
    assert summary["distinct"] == len(set(TEXT_IDS))    # distinct tokens over all the samples
    # README's pictures: the loss curve from the log, the trajectory from noise to the text.
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert any("val" in r for r in rows)
    assert all({"loss", "mse", "ce"} <= r.keys() for r in rows if "val" not in r)
    spec = importlib.util.spec_from_file_location("pictures", f"{ROOT}/assets/pictures.py")
    pictures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pictures)
    pictures.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--steps=8", f"--out_dir={out}"])
    printed = [line for line in capsys.readouterr().out.splitlines() if ", t = " in line]
    assert len(printed) == 2 * 8 and printed[7] == f"sample 0, t = 1.000 | {TEXT!r}"
    assert printed[-1] == f"sample 1, t = 1.000 | {TEXT!r}"
    for picture in ("loss.png", "trajectory.png", "trajectory_pca.png", "training_step.png",
                    "sampling.png"):
        assert os.path.getsize(os.path.join(out, picture)) > 5000, picture


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


def test_sampling_noise_is_not_the_gaussian_tables_stream(data_dir, tmp_path, monkeypatch):
    # The table is randn from embedding_seed; on the CPU, a sampler seeded alike would start sample
    # i at the embeddings of ids 64i, 64i + 1, ... (runs like "ABCD" where the model is unsure).
    ckpt = run_train(data_dir, tmp_path / "out", "--max_iters=1", "--eval_interval=1")
    generators = []
    monkeypatch.setattr(sample, "generate_all", lambda *args: generators.append(args[6]) or [[]])
    sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--num_samples=1",
                 f"--out={tmp_path / 's.jsonl'}", "--seed=0"])
    table = elf.TokenEmbedding(elf.ELFConfig(**ckpt["model_config"])).table
    first = torch.randn(table.shape[1], generator=generators[0])
    assert ckpt["model_config"]["embedding_seed"] == 0 and not torch.allclose(first, table[0])
    assert torch.equal(torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0)),
                       table[0])                    # what the seed alone would have drawn


def test_learning_rate_schedules():
    tc = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert elf.lr_at(0, tc) == pytest.approx(0.1)
    assert elf.lr_at(9, tc) == 1.0 and elf.lr_at(100, tc) == 1.0
    tc.lr_schedule = "cosine"
    assert elf.lr_at(60, tc) == pytest.approx(0.55) and elf.lr_at(110, tc) == pytest.approx(0.1)


def test_muon_lr_scales_the_schedule_for_the_blocks_matrices():
    tc, mc = train.parse_args(flags(*TINY, "--lr=0.002", "--muon_lr=0.01", "--warmup_iters=0",
                                    "--lr_schedule=cosine", "--max_iters=4"))
    trainer = train.Trainer(tc, mc, torch.device("cpu"))
    muon, adam = trainer.optimizers
    for it in range(3):
        trainer.step(None)                                  # random tokens
        assert adam.param_groups[0]["lr"] == pytest.approx(elf.lr_at(it, tc))
        assert muon.param_groups[0]["lr"] == pytest.approx(5 * elf.lr_at(it, tc))
    assert isinstance(muon, torch.optim.Muon) and elf.lr_at(2, tc) < elf.lr_at(0, tc)
    tc, mc = train.parse_args(flags(*TINY, "--lr=0.002", "--max_iters=4"))
    trainer = train.Trainer(tc, mc, torch.device("cpu"))
    trainer.step(None)                                      # muon_lr 0: lr's
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(elf.lr_at(0, tc))
    assert train.QUICK_START["muon_lr"] > train.QUICK_START["lr"]    # the cpu preset's


@pytest.mark.parametrize("cpu_bf16, dtype, bf16", [(True, "auto", True), (False, "auto", False),
                                                   (True, "float32", False),
                                                   (False, "bfloat16", True)])
def test_dtype_auto_is_bf16_on_cpus_with_bf16_units(monkeypatch, cpu_bf16, dtype, bf16):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    tc, mc = train.parse_args(flags(*TINY, f"--dtype={dtype}"))
    trainer = train.Trainer(tc, mc, torch.device("cpu"))
    with trainer.autocast:
        out = trainer.model.in_proj(torch.zeros(1, 2 * mc.embed_dim))
    assert (out.dtype == torch.bfloat16) == bf16


def test_config_overrides_and_presets():
    tc, mc = train.parse_args(["--preset=elf-b-owt", "--lr=1e-3", "--compile=false"])
    assert (tc.model, tc.batch_size, tc.grad_accum, tc.lr) == ("elf-b", 512, 8, 1e-3)
    assert (mc.n_layer, mc.n_embd, mc.block_size, mc.embed_dim) == (12, 768, 1024, 512)
    tc, mc = train.parse_args(["--n_layer=3", "--guidance=false", "--resume"])
    assert mc.n_layer == 3 and mc.guidance is False and tc.resume is True


@pytest.mark.parametrize("args, message", [
    (["--max_iter=5"], r"unknown config key --max_iter \(python train.py --help lists them\)"),
    (["--max_iters=ten"], "--max_iters expects int"),
    (["--preset=huge"], "unknown preset"),
    (["--model=elf-xxl"], "--model must be one of elf-b"),
    (["--batch_size=10", "--grad_accum=3"], "not a multiple"),
])
def test_bad_config_is_a_clear_error(args, message):
    with pytest.raises(train.RunError, match=message):
        train.parse_args(args)


def test_bad_inputs_are_clear_errors(data_dir, tmp_path):
    paths = [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/o", *TINY]
    with pytest.raises(train.RunError, match="prepare_data.py"):
        train.main(["--dataset=nothing", *paths])
    with pytest.raises(train.RunError, match="lower --block_size"):
        train.main(flags("--dataset=one", *paths, "--block_size=64"))
    with pytest.raises(train.RunError, match="no checkpoint"):
        run_train(data_dir, tmp_path / "o", "--resume")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(train.RunError, match="cannot write to"):
        run_train(data_dir, blocker / "out")
    run_train(data_dir, tmp_path / "o", "--max_iters=2", "--eval_interval=2")
    with pytest.raises(train.RunError, match=r"n_layer \(checkpoint 2, requested 3\)"):
        run_train(data_dir, tmp_path / "o", "--resume", "--n_layer=3")
    (tmp_path / "o" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train.RunError, match="truncated or corrupt"):
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
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def test_command_line_errors_are_one_line(tmp_path):
    for args in (["train.py", "--lr_warmup=5"], ["train.py", f"--data_dir={tmp_path}"],
                 ["sample.py", "--ckpt", str(tmp_path / "none.pt")]):
        result = cli(*args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_benches_print_one_json_line():
    result = cli("train.py", "--bench", "--model=elf-cpu", "--n_layer=1", "--batch_size=4",
                 "--block_size=16", "--bench_warmup=1", "--bench_steps=2")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["bench"] == "train" and stats["tokens_per_s"] > 0 and stats["step_s"] > 0
    result = cli("sample.py", "--bench", "--model=elf-cpu", "--batch_size=2", "--length=16",
                 "--steps=2", "--bench_batches=1", "--ckpt=none")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["bench"] == "sample" and stats["sequences_per_s"] > 0


# ----------------------------------------------------------------------------------------------
# Several processes, interruptions, bad data: training never silently goes wrong or loses work.

@pytest.fixture
def random_data_dir(tmp_path):
    """Random tokens, so that every micro-batch sees different windows."""
    return str(random_dataset(tmp_path / "rdata" / "rand", n_tokens=2000).parent)


def test_two_processes_match_one_with_the_same_global_batch(random_data_dir, tmp_path):
    args = flags("--dataset=rand", f"--data_dir={random_data_dir}", *TINY, "--batch_size=8",
                 "--grad_accum=2", "--max_iters=4", "--eval_interval=4", "--log_interval=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = subprocess.run([*torchrun, "train.py", *args, f"--out_dir={tmp_path / 'ddp'}"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "= 4 x 1 accumulation x 2 processes" in ddp.stdout
    single = cli("train.py", *args, f"--out_dir={tmp_path / 'one'}")
    assert "= 4 x 2 accumulation x 1 processes" in single.stdout

    def losses(out):
        return [float(line.split("loss ")[1].split()[0])
                for line in out.splitlines() if " loss " in line]

    assert losses(ddp.stdout) == pytest.approx(losses(single.stdout), rel=1e-4)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("ddp", "one"))
    for name, tensor in a["model"].items():
        difference = (tensor - b["model"][name]).abs().max()
        # Round-off of the summation order, grown by Muon's Newton-Schulz steps, reaches ~2e-5;
        # a wrong split of the batch would differ by a whole update (lr 2e-3).
        assert torch.allclose(tensor, b["model"][name], atol=1e-4), (name, difference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(random_data_dir, tmp_path, signum):
    args = ["train.py", *flags("--dataset=rand", f"--data_dir={random_data_dir}",
                               f"--out_dir={tmp_path}", *TINY, "--max_iters=100000",
                               "--log_interval=1", "--eval_interval=100000")]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:                                          # wait until training runs
        if line.startswith("iter 3:"):
            break
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted" in out and "--resume" in out and "Traceback" not in err
    iteration = torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter"]
    assert iteration >= 3
    resumed = cli(*args[:-2], f"--max_iters={iteration + 2}", "--eval_interval=1000", "--resume")
    said = f"resumed from {tmp_path / 'ckpt.pt'} at iteration {iteration}"
    assert said in resumed.stdout, resumed.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    run_train(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(train.RunError, match=r"non-finite loss or gradient after iteration \d+,"):
        run_train(data_dir, tmp_path, "--resume", "--max_iters=50", "--eval_interval=50",
                  "--log_interval=5", "--lr=1e30", "--grad_clip=1e30")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_bad_shards_are_clear_errors(tmp_path):
    folder = tmp_path / "d" / "bad"
    folder.mkdir(parents=True)
    base = ["--dataset=bad", f"--data_dir={tmp_path / 'd'}", f"--out_dir={tmp_path / 'o'}", *TINY,
            "--max_iters=1"]
    (folder / "train.bin").write_bytes(b"\x01" * 300)                 # the format before shards
    with pytest.raises(train.RunError, match="again if it has train.bin"):
        train.main(base)
    train_shard, val_shard = folder / "bad_train_000001.bin", folder / "bad_val_000000.bin"
    write_shard(val_shard, list(range(100)))
    train_shard.write_bytes(b"\x01" * 1500)                            # no header
    with pytest.raises(train.RunError, match=f"{train_shard}: not a token shard"):
        train.main(base)
    write_shard(train_shard, list(range(100)))
    train_shard.write_bytes(train_shard.read_bytes()[:-2])            # one token short
    with pytest.raises(train.RunError, match=f"{train_shard}: its size does not match"):
        train.main(base)
    write_shard(train_shard, [60000] * 200)                           # ids beyond the vocabulary
    with pytest.raises(train.RunError, match="token id 60000 >= the tokenizer's"):
        train.main(base)


@pytest.mark.parametrize("bad", ["--batch_size=0", "--num_samples=-2", "--steps=0", "--length=0",
                                 "--bench_batches=0", "--cfg_scale=nan", "--gamma=-1",
                                 "--scale=inf", "--seed=-1", "--seed=2147483648",
                                 "--batch_size=100000000", "--num_samples=1e9"])
def test_sample_arguments_out_of_range_are_one_line_errors(bad, capsys):
    """Checked before anything is loaded: counts from 1 to a bound, scales finite and non-negative,
    seeds below 2**31 (as train.py's); a flag given twice is refused."""
    flag = bad.split("=")[0]
    expected = rf"^error: argument {flag}: (must be >= \S+ and < \S+|invalid int value).*\)$"
    with pytest.raises(SystemExit, match=expected):
        sample.main([bad, "--ckpt=surely/missing.pt"])
    with pytest.raises(SystemExit, match="^error: --seed is given twice: keep one"):
        sample.main(["--seed=1", "--ckpt=surely/missing.pt", "--seed=2"])
    assert capsys.readouterr().err == ""
