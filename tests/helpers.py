"""Small helpers shared by the tests."""
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
