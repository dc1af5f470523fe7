"""The token shard format, for the data scripts (no torch needed).

A shard is 256 int32 header words (magic, version, token count, then zeros) followed by the tokens
as uint16. Every document begins with BOS. train_gpt.py keeps its own copy of these facts, since it
must run alone when copied into a record folder; data/data_test.py checks that the two agree.
"""
import os
import stat

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256
# header word 3 of the shards data/synthetic.py writes (FineWeb's hold 0 there): runs on them judge no loss target
SYNTHETIC_WORD, SYNTHETIC_MARK = 3, 0x53594E54  # "SYNT"
HEADER_BYTES = 4 * HEADER_WORDS
BOS_ID = 50256
GPT2_VOCAB_SIZE = 50257  # a shard's token ids lie below this


def shard_problem(path):
    """None if path is a well-formed shard, else a sentence saying what is wrong with it."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a folder, or a pipe, which would block the read below
            return f"is not a file but a {'folder' if stat.S_ISDIR(mode) else 'pipe, socket or device'}"
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if len(raw) < HEADER_BYTES:
        return f"is too short to be a token shard ({size} bytes; the header alone is {HEADER_BYTES})"
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        return f"is not a token shard (magic {header[0]}, expected {SHARD_MAGIC})"
    if header[1] != SHARD_VERSION:
        return f"has shard version {header[1]}, expected {SHARD_VERSION}"
    expected = HEADER_BYTES + 2 * int(header[2])
    if size != expected:
        return f"has {size} bytes but its header promises {header[2]} tokens ({expected} bytes): truncated or corrupt"
    return None
