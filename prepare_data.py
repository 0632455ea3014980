"""
Tokenize UTF-8 text into uint16 token shards for the diffusion language model.

    python prepare_data.py                                   # Tiny Shakespeare
    python prepare_data.py --input notes.txt books/ --name mix

Writes <out_dir>/<name>/train.bin, val.bin (raw np.uint16) and meta.json.
Each file is one document; GPT-2's end-of-text token follows every document.
"""
import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

def fail(msg):
    # one clear line on stderr instead of a traceback; tests catch the SystemExit
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)

def download_shakespeare(out_dir):
    path = Path(out_dir) / "tinyshakespeare.txt"
    if path.exists():
        return path
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
            data = r.read()  # fully in memory first: no half-written file on failure
    except OSError as e:  # URLError, timeouts and DNS failures are all OSErrors
        fail(f"could not download Tiny Shakespeare ({e}); pass --input path/to/tinyshakespeare.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path

def find_files(paths):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                fail(f"no .txt files found in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            fail(f"input path does not exist: {p}")
    return files

def read_documents(paths):
    """Return [(path, text)] for every non-blank document, in the order given."""
    docs = []
    for f in find_files(paths):
        raw = f.read_bytes()
        try:
            # decode the whole file at once so e.start is the true byte offset
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            fail(f"{f} is not valid UTF-8 (byte offset {e.start}: {raw[e.start:e.start + 1]!r})")
        if text.strip():  # blank files would only add stray end-of-text tokens
            docs.append((f, text))
    if not docs:
        fail("input is empty: every file is empty or whitespace only")
    return docs

def get_encoder():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without a cache: network error deep in tiktoken
        fail(f"could not load the gpt2 tokenizer ({type(e).__name__}); set TIKTOKEN_CACHE_DIR to a folder holding its files")

def tokenize(docs):
    enc = get_encoder()
    assert enc.n_vocab <= 2**16, "token ids must fit in uint16"
    ids = []
    for _, text in docs:
        # encode_ordinary: a literal "<|endoftext|>" in the text stays plain text
        ids.extend(enc.encode_ordinary(text))
        ids.append(enc.eot_token)
    return np.array(ids, dtype=np.uint16)

def write_split(tokens, out_dir, name, val_fraction, sources):
    # a plain cut of the concatenated stream: deterministic and order preserving
    n_val = round(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    if n_val < 2 or n_train < 2:
        fail(f"only {len(tokens)} tokens: the split gives {n_train} train / {n_val} val, "
             "need at least 2 each; use more text or change --val_fraction")
    d = Path(out_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    tokens[:n_train].tofile(d / "train.bin")
    tokens[n_train:].tofile(d / "val.bin")
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256,
            "train_tokens": int(n_train), "val_tokens": int(n_val),
            "sources": [str(s) for s in sources], "dtype": "uint16"}
    (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d, meta

def main(argv=None):
    ap = argparse.ArgumentParser(description="Tokenize UTF-8 text into uint16 shards (GPT-2 BPE).")
    ap.add_argument("--input", nargs="+", help="text files and/or folders of *.txt (default: download Tiny Shakespeare)")
    ap.add_argument("--name", help="dataset name (default: stem of the first input)")
    ap.add_argument("--out_dir", default="data")
    ap.add_argument("--val_fraction", type=float, default=0.1)
    args = ap.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")

    inputs = args.input or [download_shakespeare(args.out_dir)]
    name = args.name or Path(os.path.abspath(inputs[0])).stem
    docs = read_documents(inputs)
    tokens = tokenize(docs)
    d, meta = write_split(tokens, args.out_dir, name, args.val_fraction, [p for p, _ in docs])
    print(f"{len(docs)} document(s), {len(tokens):,} tokens: {meta['train_tokens']:,} train / "
          f"{meta['val_tokens']:,} val -> {d}/train.bin, val.bin, meta.json")

if __name__ == "__main__":
    main()
