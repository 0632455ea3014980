"""Small helpers shared by the tests."""
import signal
import time
from pathlib import Path

import numpy as np

import prepare_data


def write_shard(path, tokens):
    """A whole token shard in llm.c's format at once (prepare_data.py appends as it goes)."""
    Path(path).write_bytes(prepare_data.header(len(tokens)) + np.asarray(tokens, "<u2").tobytes())


def flags(*args):
    """train.py flags, a later one replacing an earlier one of the same key (train.py refuses a key
    given twice), in the order the keys first came."""
    return list({arg.partition("=")[0]: arg for arg in args}.values())


def random_dataset(folder, n_tokens=500, seed=0):
    """data/<name>/ with a train and a val shard of random token ids below 1000 (the same draws
    as before, shard by shard); returns the folder."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, index in (("train", 1), ("val", 0)):
        path = folder / f"{folder.name}_{split}_{index:06d}.bin"
        write_shard(path, rng.integers(0, 1000, n_tokens))
    return folder


def wait_for_handlers(proc, timeout=60):
    """Wait until proc catches SIGTERM (Linux: its SigCgt mask), which Python leaves alone: the
    script has installed its handlers (SIGINT's first), however slowly it starts on a busy machine.
    (SIGINT is caught from the interpreter's start, before the site module is even imported.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines()
                          if line.startswith("SigCgt:")), 16)
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.01)
