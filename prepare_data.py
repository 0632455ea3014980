"""
Tokenize text into GPT-2 token shards for the diffusion language model: streamed, on all cores.

    python prepare_data.py                                       # Tiny Shakespeare (downloaded)
    python prepare_data.py --input notes.txt books/ web.jsonl.gz --name mix
    python prepare_data.py --hf_dataset Skylion007/openwebtext   # streamed; pip install datasets
    python prepare_data.py --pairs pairs.jsonl --block_size 64   # {"source": ..., "target": ...}

Writes data/NAME/NAME_val_000000.bin, NAME_train_000001.bin, ... (the shards of llm.c and
modded-nanogpt) and meta.json. GPT-2's end-of-text token follows every document: a .txt file, a JSON
line, a dataset row. Val is the last --val_fraction of the tokens, at most one shard.
"""
import argparse
import collections
import functools
import gzip
import json
import multiprocessing
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

MAGIC, VERSION, HEADER_BYTES, EOT = 20240520, 1, 256 * 4, 50256
CHUNK_CHARS = 1 << 20  # text per tokenizer task; a few tasks per worker in flight bound the memory
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")

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

@functools.cache
def get_encoder():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 (offline without a cache: a network error deep inside)
        fail(f"could not load the gpt2 tokenizer ({type(e).__name__}); "
             "set TIKTOKEN_CACHE_DIR to a folder holding its files")

def decode_texts(rows, eot=EOT):
    """Rows of token ids (samples) -> strings, each cut at its first end-of-text token."""
    return [get_encoder().decode(row[:row.index(eot)] if eot in row else row) for row in rows]

def read_jsonl(path, *keys):
    """All rows of a JSON-lines file if each is an object with these string fields, else None."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    valid = all(isinstance(r, dict) and all(isinstance(r.get(k), str) for k in keys) for r in rows)
    return rows if rows and valid else None

# ----------------------------------------------------------------------------------------------
# Shards as in llm.c: a header of 256 int32 (magic, version, token count), then uint16 tokens.

def header(count):
    return np.array([MAGIC, VERSION, count] + [0] * 253, dtype="<i4").tobytes()

def write_shard(path, tokens):
    """A whole shard at once (tests, small tools); main streams through write_train_shards."""
    Path(path).write_bytes(header(len(tokens)) + np.asarray(tokens, dtype="<u2").tobytes())

def read_shard(path):
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)

def write_train_shards(folder, name, size, parts):
    """Appends token arrays, as they come, to NAME_train_000001.bin, ... of `size` tokens each.
    Returns [[path, tokens]]; the headers' counts are written at the end (finish_shards)."""
    shards, f = [], None
    for part in parts:
        while len(part):
            if not shards or shards[-1][1] == size:
                if f:
                    f.close()
                shards.append([folder / f"{name}_train_{len(shards) + 1:06d}.bin", 0])
                f = open(shards[-1][0], "wb")  # noqa: SIM115 (one file after the other)
                f.write(header(0))
            room = size - shards[-1][1]
            f.write(part[:room].astype("<u2"))
            shards[-1][1] += len(part[:room])
            part = part[room:]
    if f:
        f.close()
    return shards

def finish_shards(shards, val_path, n_val):
    """Copy the stream's last n_val tokens (at most a shard's) into the val shard, then cut them
    from the train shards and write the final token counts into their headers."""
    begin = sum(n for _, n in shards) - n_val               # where val starts in the stream
    with open(val_path, "wb") as out:
        out.write(header(n_val))
        for shard in shards:
            keep, begin = min(shard[1], max(begin, 0)), begin - shard[1]
            if keep < shard[1]:                             # memory-mapped: no copy in memory
                out.write(np.memmap(shard[0], dtype="<u2", mode="r", offset=HEADER_BYTES)[keep:])
            shard[1] = keep
    for path, n in shards:
        with open(path, "r+b") as f:
            f.truncate(HEADER_BYTES + 2 * n)
            f.write(header(n))
        if n == 0:
            os.remove(path)
    return [shard for shard in shards if shard[1]]

# ----------------------------------------------------------------------------------------------
# Documents, streamed as (text, ends_document) pieces: .txt files and folders, JSON lines, datasets.

def walk(paths):
    """The input files one at a time: files as given, folders walked in sorted order."""
    for path in map(Path, paths):
        if not path.is_dir():
            yield path
        for root, dirs, names in os.walk(path):   # nothing for a file
            dirs.sort()                             # in place: os.walk then visits them in order
            yield from (Path(root, f) for f in sorted(names) if f.endswith(SUFFIXES))

def text_pieces(path, stats):
    """A text file in pieces of about CHUNK_CHARS, each cut after a line break between two non-blank
    characters: GPT-2's pre-tokenizer always splits there, so the tokens are the whole file's."""
    carry = ""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_CHARS) + f.readline():  # whole lines, so whole UTF-8 characters
            try:
                text = carry + chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(f"{path} is not valid UTF-8 (byte offset {f.tell() - len(chunk) + e.start}: "
                     f"{chunk[e.start:e.start + 1]!r})")
            stats["bytes"], cut, i = stats["bytes"] + len(chunk), 0, len(text) - 1
            while not cut and (i := text.rfind("\n", 0, i)) > 0:
                cut = 0 if text[i - 1].isspace() or text[i + 1].isspace() else i + 1
            if cut:
                yield text[:cut], False
            carry = text[cut:]
    if carry.strip():                       # blank files give no document
        yield carry, True

def jsonl_rows(path, keys, stats, hint=""):
    """The objects of a .jsonl or .jsonl.gz file one at a time, checked to have these text fields."""
    if not os.path.isfile(path):
        fail(f"{path} does not exist")
    with open(path, "rb") as raw, (gzip.open(raw) if str(path).endswith(".gz") else raw) as lines:
        number, start = 0, stats["bytes"]
        try:
            for number, line in enumerate(lines, 1):
                stats["bytes"] = start + raw.tell()         # read from disk, compressed or not
                if not line.strip():
                    continue
                row = json.loads(line)
                if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in keys)):
                    fail(f"{path}, line {number}: want objects with text field(s) {keys}{hint}")
                yield row
        except (ValueError, OSError, EOFError) as e:      # bad JSON or UTF-8; a damaged .gz, whose
            number += not isinstance(e, ValueError)       # line was not counted yet
            fail(f"{path}, line {number}: {type(e).__name__}: {str(e).splitlines()[0]}")

def file_pieces(paths, field, stats):
    for path in walk(paths):
        if str(path).endswith((".jsonl", ".jsonl.gz")):
            rows = jsonl_rows(path, [field], stats, " (see --text_field)")
            yield from ((row[field], True) for row in rows if row[field].strip())
        else:
            yield from text_pieces(path, stats)

def hf_pieces(name, config, split, field, stats):
    """The rows of a Hugging Face dataset, streamed: nothing is downloaded ahead."""
    try:
        import datasets
    except ImportError:
        fail("--hf_dataset needs the optional `datasets` package: pip install datasets")
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 (unknown names, network, configs: many kinds)
        fail(f"could not open dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0]})")
    for row in rows:
        if not isinstance(row.get(field), str):
            fail(f"dataset {name!r} has no text field {field!r}: pass --text_field")
        stats["bytes"] += len(row[field])
        yield from [(row[field], True)] if row[field].strip() else []

# ----------------------------------------------------------------------------------------------
# Tokenizing: batches of about CHUNK_CHARS of text on `workers` processes, in order.

def encode(batch):
    """[(text, ends_document)] -> uint16 tokens; encode_ordinary: a literal "<|endoftext|>" is text."""
    tokens = []
    for text, ends in batch:
        tokens += get_encoder().encode_ordinary(text) + [EOT] * ends
    return np.array(tokens, dtype=np.uint16)

def tokenize(pieces, workers, stats):
    """Each batch's tokens, in order, with at most two batches per worker in flight: memory stays
    flat (Pool.imap would read the whole corpus ahead of the workers)."""
    def batches():
        batch, chars = [], 0
        for text, ends in pieces:
            batch.append((text, ends))
            chars, stats["documents"] = chars + len(text), stats["documents"] + ends
            if chars >= CHUNK_CHARS:
                yield batch
                batch, chars = [], 0
        yield batch
    if workers == 1:
        yield from map(encode, batches())
        return
    with multiprocessing.Pool(workers) as pool:
        pending = collections.deque()
        for batch in batches():
            pending.append(pool.apply_async(encode, (batch,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        yield from [result.get() for result in pending]

def progress(stats, total_bytes):
    rate = stats["bytes"] / max(stats["seconds"], 1e-9)
    eta = f", ETA {(total_bytes - stats['bytes']) / rate / 60:.1f} min" if total_bytes and rate else ""
    return (f"{stats['documents']:,} documents, {stats['tokens']:,} tokens, {stats['bytes'] / 1e6:,.1f}"
            f" MB in {stats['seconds']:.1f} s ({rate / 1e6:.1f} MB/s{eta})")

def counted(parts, stats, total_bytes):
    """The token arrays, counted; a progress line (documents, tokens, MB/s, ETA) every 10 seconds."""
    start, shown = time.perf_counter(), 0
    for part in parts:
        stats["tokens"] += len(part)
        yield part
        stats["seconds"] = time.perf_counter() - start
        if stats["seconds"] > shown + 10:
            shown = stats["seconds"]
            print(progress(stats, total_bytes), flush=True)

def pair_examples(path, block_size, stats):
    """Examples source + end-of-text + target, padded with end-of-text to block_size; the condition
    is all up to the first end-of-text. Too long: the source gives way first (down to half the
    block), then the target; both are counted in stats."""
    for pair in jsonl_rows(path, ["source", "target"], stats):
        source, target = (get_encoder().encode_ordinary(pair[k]) for k in ("source", "target"))
        keep = max(block_size // 2 - 1, block_size - 2 - len(target))
        example = source[:keep] + [EOT] + target + [EOT]
        stats["examples"] += 1
        stats["truncated_sources"] += len(source) > keep
        stats["truncated_targets"] += len(example) > block_size
        yield np.array(example[:block_size] + [EOT] * (block_size - len(example)), dtype=np.uint16)

def main(argv=None):
    ap = argparse.ArgumentParser(description="Tokenize text into GPT-2 token shards (llm.c format).")
    ap.add_argument("--input", nargs="+", help=".txt/.jsonl/.jsonl.gz files, folders of them "
                    "(default: download Tiny Shakespeare)")
    ap.add_argument("--hf_dataset", help="a Hugging Face dataset, streamed (pip install datasets)")
    ap.add_argument("--hf_config", help="its configuration, e.g. sample-10BT")
    ap.add_argument("--hf_split", default="train")
    ap.add_argument("--text_field", default="text", help="of JSON lines and dataset rows")
    ap.add_argument("--name", help="dataset name (default: from the first input)")
    ap.add_argument("--out_dir", default="data")
    ap.add_argument("--val_fraction", type=float, default=0.1, help="of the tokens, at most a shard")
    ap.add_argument("--shard_tokens", type=int, default=100_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    ap.add_argument("--pairs", help='JSON lines {"source": ..., "target": ...}: conditional examples')
    ap.add_argument("--block_size", type=int, default=64, help="with --pairs: tokens per example")
    args = ap.parse_args(argv)
    unit = args.block_size if args.pairs else 1             # paired examples are never cut
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.pairs and args.block_size < 4:
        fail(f"--block_size {args.block_size} leaves no room for a source and a target: use >= 4")
    if args.shard_tokens < unit or args.workers < 1:
        fail("--shard_tokens (at least one example) and --workers must be positive")
    stats, files = collections.Counter(), not (args.pairs or args.hf_dataset)
    sources = [args.pairs or args.hf_dataset] if not files else args.input or [
        download_shakespeare(args.out_dir)]
    for path in map(Path, sources if files else []):
        if not path.exists() or next(walk([path]), None) is None:
            fail(f"no .txt, .jsonl or .jsonl.gz files in {path}" if path.exists()
                 else f"input path does not exist: {path}")
    total_bytes = sum(f.stat().st_size for f in walk(sources)) if files else 0
    parts = (pair_examples(args.pairs, args.block_size, stats) if args.pairs else tokenize(
        file_pieces(sources, args.text_field, stats) if files else hf_pieces(
            args.hf_dataset, args.hf_config, args.hf_split, args.text_field, stats),
        args.workers, stats))
    name = args.name or Path(os.path.abspath(sources[0])).name
    for suffix in (".gz", ".jsonl", ".txt"):
        name = name.removesuffix(suffix)
    folder, staging = Path(args.out_dir) / name, Path(args.out_dir) / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:                                    # a failed run leaves the dataset of the last good one
        size = args.shard_tokens // unit * unit
        shards = write_train_shards(staging, name, size, counted(parts, stats, total_bytes))
        total = stats["tokens"]
        if total == 0:
            fail("input is empty: every document is empty or whitespace only")
        n_val = min(round(total // unit * args.val_fraction) * unit, size)
        if min(n_val, total - n_val) < max(2, unit):
            fail(f"only {total} tokens: the split gives {total - n_val} train / {n_val} val, need "
                 "at least 2 tokens (or one pair) each; use more text or change --val_fraction")
        shards = finish_shards(shards, staging / f"{name}_val_{0:06d}.bin", n_val)
        pairs = ("examples", "truncated_sources", "truncated_targets")
        meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": EOT, "dtype": "uint16",
                "train_tokens": total - n_val, "val_tokens": n_val, "train_shards": len(shards),
                "sources": list(map(str, sources)), **({"pairs": True, "block_size": args.block_size,
                **{k: stats[k] for k in pairs}} if args.pairs else {})}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        folder.mkdir(exist_ok=True)
        for old in (f for p in ("*_train_*.bin", "*_val_*.bin", "train.bin", "val.bin") for f in folder.glob(p)):
            old.unlink(missing_ok=True)     # the shards of an earlier run
        for new in staging.iterdir():
            os.replace(new, folder / new.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    what = (f"{stats['examples']:,} pairs ({stats['truncated_sources']} sources and "
            f"{stats['truncated_targets']} targets truncated to fit)" if args.pairs
            else progress(stats, total_bytes))
    print(f"{what}: {total - n_val:,} train tokens in {len(shards)} shard(s), {n_val:,} val "
          f"-> {folder}")

if __name__ == "__main__":
    main()
