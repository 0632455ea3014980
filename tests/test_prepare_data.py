import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import prepare_data

SCRIPT = Path(__file__).resolve().parents[1] / "prepare_data.py"
DOC1 = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
DOC2 = "All:\nSpeak, speak. Resolved, resolved to die than to famish?\n" * 3


def load(d):
    train = np.fromfile(d / "train.bin", dtype=np.uint16)
    val = np.fromfile(d / "val.bin", dtype=np.uint16)
    return train, val, json.loads((d / "meta.json").read_text())


def run_error(capsys, argv):
    # every bad input must end in a clean SystemExit(1) with a one-line message
    with pytest.raises(SystemExit) as e:
        prepare_data.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    return err


def test_round_trip_folder(tmp_path):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(DOC1, encoding="utf-8")
    (src / "sub" / "b.txt").write_text(DOC2, encoding="utf-8")
    (src / "ignored.md").write_text("not a .txt file")
    out = tmp_path / "out"
    prepare_data.main(["--input", str(src), "--name", "x", "--out_dir", str(out)])

    train, val, meta = load(out / "x")
    enc = tiktoken.get_encoding("gpt2")
    text = enc.decode(np.concatenate([train, val]).tolist())
    assert text == DOC1 + "<|endoftext|>" + DOC2 + "<|endoftext|>"
    assert meta["train_tokens"] == len(train) == (out / "x" / "train.bin").stat().st_size // 2
    assert meta["val_tokens"] == len(val) == (out / "x" / "val.bin").stat().st_size // 2
    assert meta["val_tokens"] == round(0.1 * (len(train) + len(val)))
    assert meta["sources"] == [str(src / "a.txt"), str(src / "sub" / "b.txt")]
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")


def test_single_file_default_name(tmp_path):
    f = tmp_path / "sonnets.txt"
    f.write_text(DOC1, encoding="utf-8")
    out = tmp_path / "out"
    prepare_data.main(["--input", str(f), "--out_dir", str(out), "--val_fraction", "0.25"])
    train, val, meta = load(out / "sonnets")
    assert train[-1] != 50256 and val[-1] == 50256  # the eot closes the document, in val
    assert len(val) == round(0.25 * (len(train) + len(val)))
    assert meta["sources"] == [str(f)]


def test_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    err = run_error(capsys, ["--input", str(missing), "--out_dir", str(tmp_path)])
    assert str(missing) in err


def test_empty_inputs(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n\n")
    assert "empty" in run_error(capsys, ["--input", str(tmp_path / "empty.txt"), "--out_dir", str(tmp_path)])
    (tmp_path / "nodocs").mkdir()
    assert "no .txt files" in run_error(capsys, ["--input", str(tmp_path / "nodocs"), "--out_dir", str(tmp_path)])


def test_invalid_utf8(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff\xfe world")
    err = run_error(capsys, ["--input", str(bad), "--out_dir", str(tmp_path)])
    assert str(bad) in err and "byte offset 6" in err


def test_too_little_text(tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    err = run_error(capsys, ["--input", str(tiny), "--out_dir", str(tmp_path)])
    assert "--val_fraction" in err
    assert not (tmp_path / "tiny").exists()


def test_script_exits_cleanly(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--input", "missing.txt"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "missing.txt" in r.stderr
    assert "Traceback" not in r.stderr
