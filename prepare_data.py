"""
Tokenize UTF-8 text into uint16 token shards for the diffusion language model.

    python prepare_data.py                                   # Tiny Shakespeare
    python prepare_data.py --input notes.txt books/ --name mix
    python prepare_data.py --pairs pairs.jsonl --block_size 64     # {"source": ..., "target": ...} per line

Writes <out_dir>/<name>/train.bin, val.bin (raw np.uint16) and meta.json. Each file is one document;
GPT-2's end-of-text token follows every document. With --pairs each line is one example (ELF.md §6).
"""
import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np

def fail(msg):  # one clear line on stderr instead of a traceback; tests catch the SystemExit
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)

def download_shakespeare(out_dir):
    path = Path(out_dir) / "tinyshakespeare.txt"
    if path.exists():
        return path
    url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()  # fully in memory first: no half-written file on failure
    except OSError as e:  # URLError, timeouts and DNS failures are all OSErrors
        fail(f"could not download Tiny Shakespeare ({e}); pass --input path/to/tinyshakespeare.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path

def find_files(paths):
    files = []
    for p in map(Path, paths):
        if not p.exists():
            fail(f"input path does not exist: {p}")
        found = sorted(f for f in p.rglob("*.txt") if f.is_file()) if p.is_dir() else [p]
        if not found:
            fail(f"no .txt files found in folder {p}")
        files += found
    return files

def read_documents(paths):
    """Return [(path, text)] for every non-blank document, in the order given."""
    docs = []
    for f in find_files(paths):
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")  # the whole file at once, so that e.start is the true byte offset
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

def decode_texts(rows, eot=50256):
    """Rows of token ids (samples) -> strings, each cut at its first end-of-text token."""
    enc = get_encoder()
    return [enc.decode(row[:row.index(eot)] if eot in row else row) for row in rows]

def tokenize(docs):
    enc = get_encoder()
    assert enc.n_vocab <= 2**16, "token ids must fit in uint16"
    # encode_ordinary: a literal "<|endoftext|>" in the text stays plain text
    return np.array([i for _, text in docs for i in enc.encode_ordinary(text) + [enc.eot_token]], dtype=np.uint16)

def read_jsonl(path, *keys):
    """The rows of a JSON-lines file if there are any and each is an object with these string fields, else None."""
    try:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        if rows and all(isinstance(row, dict) and all(isinstance(row.get(k), str) for k in keys) for row in rows):
            return rows
    except (OSError, ValueError):
        return None

def pair_examples(path, block_size, eot=50256):
    """Examples source + end-of-text + target, padded with end-of-text to block_size; the condition is all up to
    the first end-of-text. Too long: the source gives way first (down to half the block), then the target;
    both are counted. Returns (tokens, what meta.json says of them)."""
    if block_size < 4:
        fail(f"--block_size {block_size} leaves no room for a source and a target: use at least 4")
    enc, rows, cut_sources, cut_targets = get_encoder(), [], 0, 0
    pairs = read_jsonl(path, "source", "target") or fail(f'{path}: missing, or no {{"source", "target"}} lines')
    for pair in pairs:
        source, target = enc.encode_ordinary(pair["source"]), enc.encode_ordinary(pair["target"])
        keep = max(block_size // 2 - 1, block_size - 2 - len(target))
        example = source[:keep] + [eot] + target + [eot]
        cut_sources, cut_targets = cut_sources + (len(source) > keep), cut_targets + (len(example) > block_size)
        rows.append(example[:block_size] + [eot] * (block_size - len(example)))
    return np.array(rows, dtype=np.uint16).ravel(), dict(pairs=True, block_size=block_size,
                                                         truncated_sources=cut_sources, truncated_targets=cut_targets)

def write_split(tokens, out_dir, name, val_fraction, sources, **extra):
    # a plain cut of the concatenated stream (between paired examples): deterministic and order preserving
    unit = extra.get("block_size", 1)
    n_val = round(len(tokens) // unit * val_fraction) * unit
    n_train = len(tokens) - n_val
    if min(n_val, n_train) < max(2, unit):
        fail(f"only {len(tokens)} tokens: the split gives {n_train} train / {n_val} val, "
             "need at least 2 tokens (or one pair) each; use more text or change --val_fraction")
    d = Path(out_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    tokens[:n_train].tofile(d / "train.bin")
    tokens[n_train:].tofile(d / "val.bin")
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256, "train_tokens": int(n_train),
            "val_tokens": int(n_val), "sources": [str(s) for s in sources], "dtype": "uint16", **extra}
    (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d, meta

def main(argv=None):
    ap = argparse.ArgumentParser(description="Tokenize UTF-8 text into uint16 shards (GPT-2 BPE).")
    ap.add_argument("--input", nargs="+", help="text files and/or folders of *.txt (default: download Tiny Shakespeare)")
    ap.add_argument("--name", help="dataset name (default: stem of the first input)")
    ap.add_argument("--out_dir", default="data")
    ap.add_argument("--val_fraction", type=float, default=0.1)
    ap.add_argument("--pairs", help='JSON lines {"source": ..., "target": ...}: conditional examples')
    ap.add_argument("--block_size", type=int, default=64, help="with --pairs: tokens per example")
    args = ap.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    inputs = [args.pairs] if args.pairs else args.input or [download_shakespeare(args.out_dir)]
    if args.pairs:
        tokens, extra = pair_examples(args.pairs, args.block_size)
        sources, what = [args.pairs], (f"{len(tokens) // args.block_size:,} pairs ({extra['truncated_sources']} "
                                       f"sources and {extra['truncated_targets']} targets truncated to fit)")
    else:
        docs = read_documents(inputs)
        tokens, sources, what, extra = tokenize(docs), [p for p, _ in docs], f"{len(docs)} document(s)", {}
    name = args.name or Path(os.path.abspath(inputs[0])).stem
    d, meta = write_split(tokens, args.out_dir, name, args.val_fraction, sources, **extra)
    print(f"{what}, {len(tokens):,} tokens: {meta['train_tokens']:,} train / "
          f"{meta['val_tokens']:,} val -> {d}/train.bin, val.bin, meta.json")

if __name__ == "__main__":
    main()
