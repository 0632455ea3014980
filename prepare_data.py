"""Tokenize text into token shards (GPT-2 BPE unless --tokenizer) for ELF: streamed, on all cores.
No arguments: Tiny Shakespeare (downloaded); --input files and folders, --hf_dataset a Hugging Face
dataset, --pairs paired examples. Writes data/NAME/: shards and meta.json (README: Data at scale),
over an earlier dataset only once whole; an end-of-text token ends every non-blank document."""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM, even while imports load: one line, data kept
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: sys.exit("error: interrupted; the earlier dataset is kept"))

import argparse
import collections
import functools
import gzip
import itertools
import json
import os
import re
import shutil
import time
import urllib.request
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from pathlib import Path

import numpy as np

MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
CHUNK_CHARS = 1 << 20  # text per tokenizer task; a few tasks per worker in flight bound the memory
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
LAST_CUT = re.compile(r"(.*[ \t\r\n](?=\S))?", re.S)  # to the last space a non-space follows

def fail(msg):  # one clear line on stderr (exit status 1) instead of a traceback
    sys.exit(f"error: {msg}")

Tokenizer = collections.namedtuple("Tokenizer", "name encode decode eot n_vocab")
@functools.cache
def get_tokenizer(name="gpt2"):
    """The tokenizer seam: GPT-2's BPE (tiktoken) or a `transformers` one, by name or folder
    (t5-small for --embedding=t5). encode makes no special tokens; eot ends (and pads) documents."""
    try:
        if name == "gpt2":
            import tiktoken
            bpe = tiktoken.get_encoding("gpt2")
            return Tokenizer(name, bpe.encode_ordinary, bpe.decode, bpe.eot_token, bpe.n_vocab)
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(name)
        return Tokenizer(name, functools.partial(hf.encode, add_special_tokens=False),
                         functools.partial(hf.decode, skip_special_tokens=True), hf.eos_token_id,
                         len(hf))
    except Exception as e:  # noqa: BLE001 (no transformers; offline without a cache: deep inside)
        fail(f"tokenizer {name} needs the optional `transformers`: pip install transformers" if
             isinstance(e, ImportError) else f"no {name} tokenizer ({type(e).__name__}): " + (
                 "set TIKTOKEN_CACHE_DIR to its files' folder" if name == "gpt2" else
                 "fetch it once online, or pass a folder"))

def header(count):  # llm.c's shards: 256 int32 (magic, version, token count), uint16 tokens
    return np.array([MAGIC, VERSION, count] + [0] * 253, dtype="<i4").tobytes()

def append(shards, tokens, size, shard_path):
    """Appends tokens to the last of shards ([path, count]), or to shard_path(i) when full."""
    while len(tokens):
        if not shards or shards[-1][1] == size:
            shards.append([shard_path(len(shards)), 0])
            shards[-1][0].write_bytes(header(0))
        room = size - shards[-1][1]
        with open(shards[-1][0], "ab") as f:
            f.write(tokens[:room].astype("<u2"))
        shards[-1][1], tokens = shards[-1][1] + len(tokens[:room]), tokens[room:]

def write_shards(folder, name, parts, size, unit, val_fraction, stats):
    """Token arrays into train shards as they come; each one's tail to val (val_fraction so far)."""
    train, val = [], []
    for part in parts:
        stats["tokens"] += len(part)
        val_so_far = min(int(stats["tokens"] // unit * val_fraction) * unit, size)
        cut = len(part) - val_so_far + sum(n for _, n in val)
        append(train, part[:cut], size, lambda i: folder / f"{name}_train_{i + 1:06d}.bin")
        append(val, part[cut:], size, lambda i: folder / f"{name}_val_{i:06d}.bin")
    for path, count in train + val:
        with open(path, "r+b") as f:
            f.write(header(count))
    return train, val

def walk(path):  # the input files of a path: a file, or a folder's in sorted order (any case)
    if not path.exists():
        fail(f"input path does not exist: {path}")
    yield from [] if path.is_dir() else [path]
    for root, dirs, names in os.walk(path, followlinks=True):   # nothing for a file
        dirs.sort()                                 # in place: os.walk then visits them in order
        yield from (Path(root, n) for n in sorted(names) if n.lower().endswith(SUFFIXES))

def text_pieces(path, stats):
    """A text file of any size or layout in pieces of about CHUNK_CHARS, each cut before the last
    character of a whitespace run that a non-space follows, where GPT-2 always splits."""
    carry = ""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_CHARS):
            while (byte := f.peek(1)[:1]) and byte[0] & 0xC0 == 0x80:  # whole UTF-8 chars
                chunk += f.read(1)
            try:
                text = carry + chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(f"{path} is not valid UTF-8 (byte offset {f.tell() - len(chunk) + e.start})")
            stats["bytes"] += len(chunk)
            cut = max(LAST_CUT.match(text).end() - 1, 0)  # anchored: one scan back; none: 0
            yield text[:cut], False
            carry = text[cut:]
    yield carry, True

def field(row, name):  # row["a"]["b"] for name "a.b" (nested fields: WMT14's translation.de)
    for key in name.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row

def jsonl_rows(path, keys, stats):
    """The objects of a .jsonl or .jsonl.gz file, line by line, each with these string fields."""
    number = 0
    try:
        with open(path, "rb") as raw, (gzip.open(raw) if str(path).endswith(".gz") else raw) as f:
            for number, line in enumerate(f, 1):
                stats["bytes"] += len(line)
                if not line.strip():
                    continue                                # blank lines are skipped
                row = json.loads(line)
                if not all(isinstance(field(row, k), str) for k in keys):
                    fail(f"{path}, line {number}: no string field {' and '.join(keys)} (--help)")
                yield row
    except Exception as e:  # noqa: BLE001 (no file, bad JSON or UTF-8, a damaged .gz: one line)
        fail(f"{path}, line {number}: {type(e).__name__}: {str(e).splitlines()[0]}")

def hf_rows(name, config, split, keys, stats):  # a Hugging Face dataset's rows, streamed
    try:
        import datasets
        for row in datasets.load_dataset(name, config, split=split, streaming=True):
            if not all(isinstance(field(row, k), str) for k in keys):
                fail(f"dataset {name!r} has no text field {' and '.join(keys)} (--help)")
            yield row
    except Exception as e:  # noqa: BLE001 (no `datasets`, unknown names, network, a corrupt file)
        fail("a Hugging Face dataset needs the optional `datasets` package: pip install datasets"
             if isinstance(e, ImportError) else f"could not read dataset {name} ({e!r:.200})")

def batches(pieces, stats):  # non-blank pieces, about CHUNK_CHARS at a time; progress each 10 s
    batch, chars, shown = [], 0, time.perf_counter()
    for text, ends in pieces:
        if text.strip():                            # blank documents are left out
            batch.append((text, ends))
            chars, stats["documents"] = chars + len(text), stats["documents"] + ends
        if chars >= CHUNK_CHARS:
            yield batch
            batch, chars = [], 0
        if time.perf_counter() > shown + 10:
            shown = time.perf_counter()
            print(progress(stats), flush=True)
    yield batch

def encode(tokenizer, batch):  # a literal "<|endoftext|>" in the text stays text
    tok = get_tokenizer(tokenizer)
    ids = (tok.encode(text) + [tok.eot] * ends for text, ends in batch)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16)

def tokenize(batches, workers, tokenizer):
    """Each batch's tokens, in order, encoded by the workers a window of batches at a time."""
    ignore = (signal.SIGINT, signal.SIG_IGN)                # Ctrl-C is this process's
    with ProcessPoolExecutor(workers, initializer=signal.signal, initargs=ignore) as pool:
        while window := list(itertools.islice(batches, 2 * workers)):  # bounded memory
            yield from pool.map(functools.partial(encode, tokenizer), window)

def progress(stats):
    seconds, megabytes = time.perf_counter() - stats["start"], stats["bytes"] / 1e6
    return (f"{stats['documents']:,} documents, {stats['tokens']:,} tokens, {megabytes:,.1f} MB in "
            f"{seconds:.1f} s ({megabytes / seconds:.1f} MB/s)")

def pair_examples(rows, args, stats, tok, texts):
    """Examples of block_size tokens (README: Conditions): source, eot, target, padding; or the
    authors' (--source_length): the source's length, the source cut to it, target, padding."""
    block_size, cut = args.block_size, args.source_length
    with open(texts, "w") as out:
        for row in rows:
            pair = {k: field(row, getattr(args, k + "_field")) for k in ("source", "target")}
            source, target = tok.encode(pair["source"]), tok.encode(pair["target"])
            stats["documents" if target else "empty_targets"] += 1
            if not target:                                      # left out (and counted)
                continue
            keep = cut or max(block_size // 2 - 1, block_size - 2 - len(target))  # source yields
            example = source[:keep] + (target if cut else [tok.eot] + target + [tok.eot])
            stats["cut_sources"] += len(source) > keep
            stats["cut_targets"] += len(example) > block_size
            print(json.dumps(pair), file=out)
            yield [len(source[:keep])] * bool(cut) + (example + [tok.eot] * block_size)[:block_size]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.error = lambda message: fail(f"{message} (see --help)")      # one line, no usage dump
    ap.add_argument("--input", nargs="+", help=f"{'/'.join(SUFFIXES)} files, folders of them")
    ap.add_argument("--hf_dataset", help="a Hugging Face dataset, streamed (pip install datasets)")
    ap.add_argument("--hf_config", help="its configuration, e.g. sample-10BT")
    ap.add_argument("--text_field", default="text", help="of JSON lines and dataset rows")
    ap.add_argument("--name", help="dataset name (default: from the first input)")
    ap.add_argument("--out_dir", default="data")
    ap.add_argument("--val_fraction", type=float, default=0.1, help="of the tokens, up to a shard")
    ap.add_argument("--shard_tokens", type=int, default=100_000_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    ap.add_argument("--split", default="train", help="of a dataset; not train: all to val shards")
    ap.add_argument("--pairs", help="paired examples: JSON lines or a Hugging Face dataset's name")
    ap.add_argument("--source_field", default="source", help="of a pair (nested: translation.de)")
    ap.add_argument("--target_field", default="target", help="of a pair (nested: translation.en)")
    ap.add_argument("--block_size", type=int, default=64, help="with --pairs: tokens per example")
    ap.add_argument("--source_length", type=int, help="--pairs as the authors: source cut to this")
    ap.add_argument("--tokenizer", default="gpt2", help="gpt2 (tiktoken) or a transformers name")
    flags = [arg.split("=")[0] for arg in (sys.argv[1:] if argv is None else argv)]
    if twice := sorted({flag for flag in flags if flag.startswith("--") and flags.count(flag) > 1}):
        fail(f"{twice[0]} is given twice: keep one")
    args = ap.parse_args(argv)
    unit = args.block_size + (args.source_length is not None) if args.pairs else 1  # never cut
    if not (0 < args.val_fraction < 1 and args.workers > 0 and args.shard_tokens >= unit > 3 * (
            args.pairs is not None) and 0 <= (args.source_length or 0) < args.block_size):
        fail("want 0 < --val_fraction < 1, --workers > 0, --shard_tokens >= --block_size >= 4, "
             "0 <= --source_length < --block_size")
    if (tok := get_tokenizer(args.tokenizer)).n_vocab > 2**16:
        fail(f"{tok.name} has {tok.n_vocab:,} tokens: more than uint16 shards hold")
    if not (args.pairs or args.hf_dataset or args.input):     # the quick start's text, once
        args.input = [Path(args.out_dir) / "tinyshakespeare.txt"]
        try:                                                    # read whole, then written
            if not args.input[0].exists():
                args.input[0].parent.mkdir(parents=True, exist_ok=True)
                args.input[0].write_bytes(urllib.request.urlopen(URL, timeout=30).read())
        except OSError as e:  # URLError, timeouts and DNS failures are all OSErrors
            fail(f"could not download Tiny Shakespeare ({e}); pass --input tinyshakespeare.txt")
    sources = [args.pairs] if args.pairs else [args.hf_dataset] if args.hf_dataset else args.input
    stats = collections.Counter(start=time.perf_counter())
    keys = [args.source_field, args.target_field] if args.pairs else [args.text_field]
    rows = (jsonl_rows(args.pairs, keys, stats) if str(sources[0]).endswith(SUFFIXES[1:]) else
            hf_rows(sources[0], args.hf_config, args.split, keys, stats))  # --input: not read
    pieces = (((field(row, keys[0]), True) for row in rows) if args.hf_dataset
              else (piece for path in args.input or [] for f in walk(Path(path)) for piece in (
                  ((field(row, keys[0]), True) for row in jsonl_rows(f, keys, stats))
                  if f.name.lower().endswith(SUFFIXES[1:]) else text_pieces(f, stats))))
    name = args.name or Path(os.path.abspath(sources[0])).name.split(".")[0]
    if name in ("", ".", "..") or Path(name).name != name:
        fail(f"--name {name!r} is not a folder name: give one without '/'")
    work = (folder := Path(args.out_dir) / name) / f".new.{os.getpid()}"  # moved up once whole
    try:
        work.mkdir(parents=True)
        texts = work / "pairs.jsonl" if (evaluation := args.split != "train") else os.devnull
        examples = pair_examples(rows, args, stats, tok, texts) if args.pairs else None
        parts = (tokenize(batches(pieces, stats), args.workers, tok.name)
                 if not args.pairs else (np.uint16(chunk).ravel() for chunk in iter(  # 4,096
                     lambda: list(itertools.islice(examples, 4096)), [])))  # examples at a time
        train, val = write_shards(work, name, parts, args.shard_tokens // unit * unit, unit,
                                  1 if evaluation else args.val_fraction, stats)  # whole examples
        n_train, n_val = (sum(n for _, n in shards) for shards in (train, val))
        if (n_val if evaluation else min(n_train, n_val)) < max(2, unit):
            fail(f"{n_train} train / {n_val} val tokens, want 2 (or a pair) each: add text or "
                 "change --val_fraction" if n_train else f"no non-blank text in {sources[0]}")
        meta = dict(tokenizer=tok.name, vocab_size=tok.n_vocab, eot_token=tok.eot, val_tokens=n_val,
                    train_tokens=n_train, train_shards=len(train), sources=list(map(str, sources)))
        if args.pairs:                                  # source_length set: the authors' layout
            meta |= dict(pairs=True, block_size=args.block_size, source_length=args.source_length,
                         examples=stats["documents"], **{k: stats[k] for k in (
                             "cut_sources", "cut_targets", "empty_targets")})
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for old in [*folder.glob("*_train_*.bin"), *folder.glob("*_val_*.bin"),
                    *folder.glob("meta.json"), *folder.glob("pairs.jsonl")]:   # the earlier dataset
            old.unlink()
        for new in work.iterdir():
            new.replace(folder / new.name)
    except OSError as e:
        fail(f"cannot write {e.filename or folder} ({e.strerror}): free space or another --out_dir")
    except BrokenExecutor:
        fail("a tokenizer process died (out of memory?): try fewer --workers")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{progress(stats)}: {n_train:,} train tokens in {len(train)} shard(s), {n_val:,} val -> "
          f"{folder}" + f" ({stats['cut_sources']} sources, {stats['cut_targets']} targets cut, "
          f"{stats['empty_targets']} empty targets left out)" * bool(args.pairs))

if __name__ == "__main__":
    main()
