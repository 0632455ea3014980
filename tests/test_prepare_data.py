import collections
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import prepare_data
from helpers import wait_for_handlers, write_shard

SCRIPT = Path(__file__).resolve().parents[1] / "prepare_data.py"
DOC1 = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
DOC2 = "All:\nSpeak, speak. Resolved, resolved to die than to famish?\n" * 3


def read_shard(path):
    return np.fromfile(path, dtype=np.uint16, offset=1024)


def load(d):
    """All train shards' tokens in order, the val shard's, meta.json."""
    train = np.concatenate([read_shard(f) for f in sorted(d.glob("*_train_*.bin"))])
    val = np.concatenate([read_shard(f) for f in sorted(d.glob("*_val_*.bin"))])
    return train, val, json.loads((d / "meta.json").read_text())


def run_error(capsys, argv):
    # every bad input must end in a clean SystemExit(1) with a one-line message
    with pytest.raises(SystemExit) as e:
        prepare_data.main(argv)
    err = str(e.value.code) + "\n"               # sys.exit(message): printed, exit status 1
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
    assert sorted(p.name for p in (out / "x").iterdir()) == [
        "meta.json", "x_train_000001.bin", "x_val_000000.bin"]
    shard_bytes = (out / "x" / "x_train_000001.bin").stat().st_size
    assert meta["train_tokens"] == len(train) == (shard_bytes - 1024) // 2
    assert meta["val_tokens"] == len(val) == int(0.1 * (len(train) + len(val)))
    assert meta["sources"] == [str(src)]
    kind = (meta["tokenizer"], meta["vocab_size"], meta["eot_token"])
    assert kind == ("gpt2", 50257, 50256)
    header = np.fromfile(out / "x" / "x_val_000000.bin", dtype=np.int32, count=256)
    assert header[:3].tolist() == [20240520, 1, len(val)] and not header[3:].any()


def test_single_file_default_name(tmp_path):
    f = tmp_path / "sonnets.txt"
    f.write_text(DOC1, encoding="utf-8")
    out = tmp_path / "out"
    prepare_data.main(["--input", str(f), "--out_dir", str(out), "--val_fraction", "0.25"])
    train, val, meta = load(out / "sonnets")
    assert train[-1] != 50256 and val[-1] == 50256  # the eot closes the document, in val
    assert len(val) == int(0.25 * (len(train) + len(val)))
    assert meta["sources"] == [str(f)]


def test_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    err = run_error(capsys, ["--input", str(missing), "--out_dir", str(tmp_path)])
    assert str(missing) in err


def test_empty_inputs(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n\n")
    err = run_error(capsys, ["--input", str(tmp_path / "empty.txt"), "--out_dir", str(tmp_path)])
    assert "no non-blank text in" in err
    (tmp_path / "nodocs").mkdir()
    err = run_error(capsys, ["--input", str(tmp_path / "nodocs"), "--out_dir", str(tmp_path)])
    assert f"no non-blank text in {tmp_path / 'nodocs'}" in err


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
    assert not list((tmp_path / "tiny").glob("*.bin"))


def test_script_exits_cleanly(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--input", "missing.txt"],
                       cwd=tmp_path, capture_output=True, text=True, check=False)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "missing.txt" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# Shards of many sizes, the same tokens whatever the chunking and the number of workers

ENC = tiktoken.get_encoding("gpt2")


def corpus(folder, n_docs, seed=0):
    """n_docs .txt documents of a few hundred characters, some multi-line, one with non-ASCII."""
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "lord", "sweet", "love", "O", "thou", "é", "名", "!", ","]
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n_docs):
        n_lines = rng.integers(1, 30)
        lines = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(n_lines)]
        texts.append("\n".join(lines) + "\n" * int(rng.integers(0, 3)))
        (folder / f"doc{i:05d}.txt").write_text(texts[-1], encoding="utf-8")
    return texts


def expected(texts):
    return [t for text in texts if text.strip() for t in ENC.encode_ordinary(text) + [50256]]


def test_shards_and_workers(tmp_path, monkeypatch):
    texts = corpus(tmp_path / "c", 60)
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 300)  # many batches, each with a val tail
    for workers in ("1", "2"):
        prepare_data.main(["--input", str(tmp_path / "c"), "--name", f"w{workers}", "--out_dir",
                           str(tmp_path), "--shard_tokens", "1000", "--workers", workers])
    train, val, meta = load(tmp_path / "w1")
    assert sorted(np.concatenate([train, val]).tolist()) == sorted(expected(texts))
    assert len(val) == meta["val_tokens"] == int(0.1 * (len(train) + len(val)))
    sizes = [len(read_shard(f)) for f in sorted((tmp_path / "w1").glob("*_train_*"))]
    assert sizes[:-1] == [1000] * (len(sizes) - 1) and 0 < sizes[-1] <= 1000
    assert meta["train_shards"] == len(sizes) > 3
    for shard in (tmp_path / "w2").glob("*.bin"):                    # the same with two workers
        assert shard.read_bytes() == (tmp_path / "w1" / shard.name.replace("w2", "w1")).read_bytes()


def test_a_large_file_in_pieces_has_the_whole_files_tokens(tmp_path, monkeypatch):
    text = "".join(corpus(tmp_path / "c", 40)) + "  \n\n x\ny \n\tz\n"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 100)
    pieces = list(prepare_data.text_pieces(tmp_path / "big.txt", collections.Counter()))
    assert len(pieces) > 20 and "".join(p for p, _ in pieces) == text and pieces[-1][1]
    assert [t for p, _ in pieces for t in ENC.encode_ordinary(p)] == ENC.encode_ordinary(text)


def test_peak_memory_stays_flat_as_the_corpus_grows(tmp_path, monkeypatch):
    # tracemalloc sees Python objects and numpy arrays: holding every token in a list (the old way)
    # takes ~40 bytes per token, here ~1 MB for the small corpus and ~8 MB for the large one.
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 4096)
    peaks = []
    for repeats in (1, 8):                            # the same 50 files, 8 times longer
        for i, text in enumerate(corpus(tmp_path / "c", 50)):
            (tmp_path / "c" / f"doc{i:05d}.txt").write_text(text * repeats * 4, encoding="utf-8")
        tracemalloc.start()
        prepare_data.main(["--input", str(tmp_path / "c"), "--out_dir", str(tmp_path),
                           "--workers=1", "--shard_tokens=20000"])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.2 * peaks[0] + 100_000 and peaks[1] < 1_000_000, peaks


def test_json_lines_plain_and_gzipped(tmp_path, capsys):
    rows = [{"text": DOC1, "id": 1}, {"text": "   "}, {"text": DOC2}]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines.replace('"text"', '"body"'))
    prepare_data.main(["--input", str(tmp_path / "in" / "b.jsonl.gz"), "--text_field", "body",
                       "--out_dir", str(tmp_path), "--val_fraction", "0.3"])
    train, val, _ = load(tmp_path / "b")
    assert np.concatenate([train, val]).tolist() == expected([DOC1, DOC2])
    assert "2 documents" in capsys.readouterr().out
    (tmp_path / "in" / "c.txt").write_text(DOC2, encoding="utf-8")       # a folder of both kinds
    prepare_data.main(["--input", str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "c.txt"),
                       "--name", "mix", "--out_dir", str(tmp_path)])
    train, val, _ = load(tmp_path / "mix")
    assert np.concatenate([train, val]).tolist() == expected([DOC1, DOC2, DOC2])
    err = run_error(capsys, ["--input", str(tmp_path / "in"), "--out_dir", str(tmp_path)])
    assert "b.jsonl.gz, line 1: no string field text" in err  # no "text" field in b.jsonl.gz
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    err = run_error(capsys, ["--input", str(tmp_path / "bad.jsonl"), "--out_dir", str(tmp_path)])
    assert "bad.jsonl, line 2" in err


def test_hugging_face_dataset_streamed_from_a_local_folder(tmp_path, capsys):
    pytest.importorskip("datasets")
    (tmp_path / "hf").mkdir()
    rows = [{"text": DOC1}, {"text": DOC2}] * 3
    (tmp_path / "hf" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_data.main(["--hf_dataset", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "out"),
                       "--workers=2"])
    train, val, meta = load(tmp_path / "out" / "hf")
    assert np.concatenate([train, val]).tolist() == expected([r["text"] for r in rows])
    assert meta["sources"] == [str(tmp_path / "hf")]
    err = run_error(capsys, ["--hf_dataset", str(tmp_path / "hf"), "--text_field", "body",
                             "--out_dir", str(tmp_path / "out")])
    assert "no text field 'body'" in err


def test_without_datasets_the_option_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    err = run_error(capsys, ["--hf_dataset", "Skylion007/openwebtext", "--out_dir", str(tmp_path)])
    assert "pip install datasets" in err


def test_a_new_run_replaces_the_old_shards(tmp_path):
    corpus(tmp_path / "c", 30)
    args = ["--input", str(tmp_path / "c"), "--out_dir", str(tmp_path), "--shard_tokens"]
    prepare_data.main([*args, "500"])
    prepare_data.main([*args, "100000"])
    assert sorted(p.name for p in (tmp_path / "c").glob("*.bin")) == ["c_train_000001.bin",
                                                                    "c_val_000000.bin"]


def test_train_py_samples_all_shards_of_a_speedrun_folder_in_proportion(tmp_path):
    # modded-nanogpt's FineWeb folders: fineweb_val_000000.bin, fineweb_train_000001.bin, ...
    import torch

    import train
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    write_shard(folder / "fineweb_val_000000.bin", np.arange(500))
    write_shard(folder / "fineweb_train_000001.bin", np.arange(3000))
    write_shard(folder / "fineweb_train_000002.bin", 40000 + np.arange(1000))
    tc, mc = train.parse_args(["--preset=elf-b-owt", "--dataset=fineweb10B",
                               f"--data_dir={tmp_path}", "--block_size=16"])
    shards, val, paired, _ = train.open_shards(tc, mc)
    assert [n for _, n in shards] == [3000, 1000] and not paired
    assert [n for _, n in val] == [500]
    rows = train.get_batch(shards, 4000, 16, torch.Generator().manual_seed(0))
    assert (rows.diff(dim=1) == 1).all()                     # whole windows, never across shards
    share = (rows[:, 0] >= 40000).float().mean().item()      # windows from the second shard
    assert abs(share - 984 / (2984 + 984)) < 0.03
    again = train.get_batch(shards, 4000, 16, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)                          # deterministic from the generator


# ----------------------------------------------------------------------------------------------
# Sturdy: any layout in bounded pieces, bad input in one line, the earlier dataset never lost

@pytest.mark.parametrize("layout", ["crlf", "paragraphs", "indented", "one_line", "tabs_unicode"])
def test_any_layout_is_cut_into_bounded_pieces_with_the_whole_files_tokens(tmp_path, monkeypatch,
                                                                          layout):
    rng = np.random.default_rng(1)
    words = ["the", "king's", "queen", "   ", "1999", "é", "名", "!!", "--", "'s", "O"]
    lines = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(400)]
    text = {"crlf": "\r\n".join(lines) + "\r\n", "paragraphs": "\n\n\n".join(lines),
            "indented": "".join("\n  " + line for line in lines), "one_line": " ".join(lines),
            "tabs_unicode": "\t\u3000".join(lines) + "\n \n"}[layout]
    (tmp_path / "t.txt").write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 200)
    pieces = [p for p, _ in prepare_data.text_pieces(tmp_path / "t.txt", collections.Counter())]
    assert "".join(pieces) == text and max(map(len, pieces)) < 2 * 200     # memory stays flat
    assert [t for p in pieces for t in ENC.encode_ordinary(p)] == ENC.encode_ordinary(text)


def test_a_failed_run_keeps_the_earlier_dataset_and_leaves_nothing_behind(tmp_path, capsys):
    corpus(tmp_path / "c", 20)
    args = ["--input", str(tmp_path / "c"), "--out_dir", str(tmp_path), "--name", "d"]
    prepare_data.main(args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    (tmp_path / "c" / "zz_bad.txt").write_bytes(b"fine text, then \xff")   # read last
    err = run_error(capsys, args)
    assert "zz_bad.txt is not valid UTF-8" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    (tmp_path / "c" / "zz_bad.txt").unlink()
    prepare_data.main(args + ["--shard_tokens", "300"])                   # a good run replaces it
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert "d_train_000002.bin" in names and not [n for n in names if n.startswith(".")]


def die(tokenizer, batch):  # a tokenizer process killed, as the out-of-memory killer would
    os._exit(9)


def test_bad_places_and_damaged_inputs_are_one_line_errors(tmp_path, capsys, monkeypatch):
    corpus(tmp_path / "c", 5)
    (tmp_path / "file").write_text("not a folder")
    good = ["--input", str(tmp_path / "c")]
    assert "cannot write" in run_error(capsys, good + ["--out_dir", str(tmp_path / "file")])
    assert "is not a folder name" in run_error(capsys, good + ["--name", "../escaped"])
    assert not (tmp_path.parent / "escaped").exists()
    assert "unrecognized arguments: --bogus" in run_error(capsys, good + ["--bogus"])
    damaged = gzip.compress(b'{"text": "x"}\n' * 50)[:-30] + b"x" * 30
    (tmp_path / "bad.jsonl.gz").write_bytes(damaged)
    assert "bad.jsonl.gz, line" in run_error(capsys, ["--input", str(tmp_path / "bad.jsonl.gz"),
                                                      "--out_dir", str(tmp_path)])
    assert "--name is given twice" in run_error(capsys, good + ["--name", "a", "--name", "b"])

    def rows(*args, **kwargs):                        # a dataset with a corrupt file in it
        yield {"text": DOC1}
        raise OSError("Parquet magic bytes not found in footer")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=rows))
    err = run_error(capsys, ["--hf_dataset", "some/set", "--out_dir", str(tmp_path)])
    assert "could not read dataset some/set (OSError('Parquet magic bytes" in err
    monkeypatch.setattr(prepare_data, "encode", die)
    err = run_error(capsys, good + ["--out_dir", str(tmp_path), "--workers", "2"])
    assert "a tokenizer process died" in err                              # not a hang


def test_upper_case_suffixes_and_linked_folders_are_read(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "b.txt").write_text(DOC2, encoding="utf-8")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "A.TXT").write_text(DOC1, encoding="utf-8")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    prepare_data.main(["--input", str(tmp_path / "in"), "--out_dir", str(tmp_path), "--name", "x"])
    train, val, _ = load(tmp_path / "x")
    assert np.concatenate([train, val]).tolist() == expected([DOC1, DOC2])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_says_so_in_one_line_and_keeps_the_dataset(tmp_path, sig):
    args = [sys.executable, str(SCRIPT), "--input", str(tmp_path / "big.txt"), "--out_dir",
            str(tmp_path), "--workers=2"]
    (tmp_path / "big.txt").write_text(DOC1)
    subprocess.run(args, check=True, capture_output=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "big").iterdir()}
    (tmp_path / "big.txt").write_text(DOC2 * 200_000)                 # 12 MB: seconds of work
    run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_handlers(run)
    time.sleep(0.5)                                                    # well into the reading
    run.send_signal(sig)
    err = run.communicate(timeout=60)[1]
    assert run.returncode == 1 and err == "error: interrupted; the earlier dataset is kept\n", err
    assert {p.name: p.read_bytes() for p in (tmp_path / "big").iterdir()} == before
