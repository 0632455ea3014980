"""Sturdy everywhere (README: Never losing work, Options): files read with
checks, outputs checked before any work, sizes bounded, and every mistake one line. A test per
class of failure, for train.py and sample.py (prepare_data.py's are in test_prepare_data.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from helpers import flags, random_dataset, wait_for_handlers, write_shard

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--embed_dim=16", "--bottleneck_dim=16",
        "--block_size=8", "--batch_size=4", "--warmup_iters=2", "--eval_iters=1",
        "--sample_steps=2", "--num_eval_samples=1", "--log_interval=1", "--eval_interval=2",
        "--max_iters=2"]


@pytest.fixture
def data(tmp_path):
    return random_dataset(tmp_path / "data" / "d")


def run(data, out, *extra):
    return train.main(flags("--dataset=d", f"--data_dir={data.parent}", f"--out_dir={out}", *TINY,
                            *extra))


def test_data_files_are_checked_before_the_first_step(data, tmp_path):
    for text, says in [("{bad", "meta.json: not prepare_data.py's"), ("", "not prepare_data.py's"),
                       ("[1, 2]", "not prepare_data.py's"),
                       ('{"pairs": true}', "a field missing or not an integer"),
                       ('{"vocab_size": "50257"}', "a field missing or not an integer")]:
        (data / "meta.json").write_text(text)
        with pytest.raises(train.RunError, match=says):
            run(data, tmp_path / "o")
    (data / "meta.json").unlink()
    (data / "meta.json").mkdir()                                        # a folder in its place
    with pytest.raises(train.RunError, match="meta.json: not prepare_data.py's"):
        run(data, tmp_path / "o")
    (data / "meta.json").rmdir()
    (data / "d_train_000002.bin").mkdir()                               # a folder named as a shard
    with pytest.raises(train.RunError, match="d_train_000002.bin: not a token shard"):
        run(data, tmp_path / "o")
    (data / "d_train_000002.bin").rmdir()
    (data / "meta.json").write_text(json.dumps({"vocab_size": 900, "tokenizer": "gpt2"}))
    with pytest.raises(train.RunError, match=r"d_train_000001.bin: token id 9\d\d >= the "
                                             "tokenizer's 900"):  # all shards: checked now
        run(data, tmp_path / "o")
    assert not (tmp_path / "o" / "ckpt.pt").exists()
    (data / "meta.json").write_text(json.dumps({"tokenizer": "no/such-tokenizer"}))
    with pytest.raises(SystemExit, match="no no/such-tokenizer tokenizer"):  # before any step
        run(data, tmp_path / "o")


def test_resume_reads_only_this_repos_checkpoints_of_the_same_run(data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    for bad, says in [(torch.zeros(3), "cannot resume from .* truncated or corrupt, or not train"),
                      ({"model": {}}, "cannot resume from"),
                      ({"model_config": "x"}, "cannot resume from")]:
        torch.save(bad, out / "ckpt.pt")
        with pytest.raises(train.RunError, match=says):
            run(data, out, "--resume", "--max_iters=4")
    run(data, out)
    with pytest.raises(train.RunError, match=r"optimizer \(checkpoint 'muon', requested 'adamw'\)"):
        run(data, out, "--resume", "--max_iters=4", "--optimizer=adamw")


def test_checkpoints_are_checked_first_and_a_full_disk_keeps_the_last_one(data, tmp_path,
                                                                          monkeypatch):
    (tmp_path / "o" / "ckpt.pt").mkdir(parents=True)                  # in the way of the first save
    steps = []
    monkeypatch.setattr(train.Trainer, "step", lambda *a: steps.append(1))
    with pytest.raises(train.RunError, match="no checkpoint file at .*ckpt.pt: pass another"):
        run(data, tmp_path / "o")
    assert steps == []                                                 # refused before any step
    monkeypatch.undo()
    run(data, tmp_path / "p")
    before = (tmp_path / "p" / "ckpt.pt").read_bytes()
    saves = []

    def full_disk(state, path):
        saves.append(path)
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] . file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(train.RunError, match="cannot write .*ckpt.pt .*file write failed.*kept"):
        run(data, tmp_path / "p", "--resume", "--max_iters=4")
    assert saves == [f"{tmp_path / 'p' / 'ckpt.pt'}.{os.getpid()}.tmp"]  # this run's own name
    assert not Path(saves[0]).exists()                                 # removed on failure
    assert (tmp_path / "p" / "ckpt.pt").read_bytes() == before


def test_token_ids_beyond_the_tokenizers_vocabulary_are_refused(data, tmp_path):
    (data / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257}))
    write_shard(data / "d_train_000001.bin", [50260] * 500)           # below the padded 50304
    with pytest.raises(train.RunError, match="token id 50260 >= the tokenizer's 50257"):
        run(data, tmp_path / "o")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_train_interrupted_before_the_first_step_says_so_in_one_line(sig, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", f"--data_dir={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_handlers(proc)                     # the script's first lines ran; torch loads
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and err == "interrupted before the first step; nothing saved\n"


# ----------------------------------------------------------------------------------------------
# sample.py

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s")
    folder = tmp / "data" / "d"
    folder.mkdir(parents=True)
    for shard in ("d_train_000001.bin", "d_val_000000.bin"):
        write_shard(folder / shard, np.arange(500) % 300)
    run(folder, tmp / "o")
    return str(tmp / "o" / "ckpt.pt")


def test_outputs_are_checked_before_any_sample_is_drawn(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("work was spent"))
    for flag in ("--out", "--results"):
        with pytest.raises(SystemExit, match=f"cannot write {tmp_path} .*another --out or --res"):
            sample.main([f"--ckpt={ckpt}", f"{flag}={tmp_path}", "--eval", "--num_samples=1"])


def test_bad_fixed_text_is_one_line_and_builds_nothing_large(ckpt, tmp_path):
    for infill in ("a [BLANK:x] b", "a [BLANK:-3] b", "a [BLANK:3 b", "[BLANK:3000000000]",
                   "[BLANK:" + "9" * 5000 + "]", "a [BLANK:0] b"):
        with pytest.raises(SystemExit, match=r"write each blank as \[BLANK:n\], n tokens in 1..8"):
            sample.main([f"--ckpt={ckpt}", "--infill", infill])
    (tmp_path / "p.txt").write_bytes(b"ROMEO \xff\xfe")
    with pytest.raises(SystemExit, match="p.txt is not UTF-8 text"):
        sample.main([f"--ckpt={ckpt}", f"--prompt_file={tmp_path / 'p.txt'}"])


def test_judging_nothing_is_not_a_perfect_score(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(SystemExit, match="all 2 samples are empty: nothing to judge"):
        sample.main(["--eval", f"--samples={tmp_path / 's.jsonl'}"])


def test_sample_interrupted_says_so_in_one_line(ckpt):
    proc = subprocess.Popen([sys.executable, "sample.py", f"--ckpt={ckpt}", "--steps=5000",
                             "--num_samples=1000", "--batch_size=1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(6)                                                      # well into sampling
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and err.endswith("error: interrupted; nothing written\n"), err
