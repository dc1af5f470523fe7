"""Synthetic token shards in FineWeb's format and names, for machines that cannot download FineWeb.

    python data/synthetic.py                       # data/synthetic: 6 x 100M train tokens + val
    python data/synthetic.py --train_shards 3 --shard_tokens 20000000 --out /tmp/synth
        # 60M train tokens: enough for a short run (--num_scheduled_iterations 150
        # --num_extension_iterations 10 --val_tokens 2097152), not for the full schedule

Then train on them with
    --train_files 'data/synthetic/fineweb_train_*.bin' --val_files 'data/synthetic/fineweb_val_*.bin'

Documents begin with BOS (50256) and have a FineWeb-like length distribution (log-normal, median
near 400 tokens, a heavy tail into the thousands). Their tokens are recurring phrases drawn from a
fixed table with Zipf frequencies, and phrase tokens are Zipf-distributed over the vocabulary, so a
model learns quickly (the loss falls far below log(vocab)). The output is deterministic for a seed.
"""
import argparse
import glob
import os
import signal
import sys
import time

import numpy as np

from shard_format import (BOS_ID, GPT2_VOCAB_SIZE, HEADER_WORDS, SHARD_MAGIC, SHARD_VERSION,  # beside this script
                          SYNTHETIC_MARK, SYNTHETIC_WORD)

NUM_PHRASES, MIN_PHRASE, MAX_PHRASE = 32768, 2, 12
DOC_MEDIAN, DOC_SIGMA, DOC_MIN, DOC_MAX = 400, 1.0, 32, 32768
CHUNK_TOKENS = 1 << 23  # tokens expanded at once: bounds memory to a few hundred MB
MAX_SHARD_TOKENS = 2**31 - 1  # the header's token count is an int32


def partial_path(path):
    """The hidden file a shard is written into before it takes its name."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")


def write_partial(path, tokens):
    """Write uint16 tokens with the 256-word int32 header (magic, version, count, the synthetic mark) into path's partial
    file; on failure, remove it."""
    tokens = np.asarray(tokens, dtype="<u2")
    if tokens.size > MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens, not {tokens.size}")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    header[SYNTHETIC_WORD] = SYNTHETIC_MARK
    try:
        with open(partial_path(path), "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.data)
    except BaseException:
        remove_partials([path])
        raise


def remove_partials(paths):
    for path in paths:
        if os.path.exists(partial_path(path)):
            os.remove(partial_path(path))


def write_shard(path, tokens):
    """Write a shard atomically: path never holds a partial one."""
    write_partial(path, tokens)
    os.replace(partial_path(path), path)


def zipf_probabilities(n, exponent, offset):
    p = 1.0 / (np.arange(n) + offset) ** exponent
    return p / p.sum()


class PhraseTable:
    """A fixed set of phrases (token sequences) and how often each is used, from the seed."""

    def __init__(self, seed):
        rng = np.random.default_rng([seed, 0])
        non_bos = np.delete(np.arange(GPT2_VOCAB_SIZE), BOS_ID)
        token_of_rank = rng.permutation(non_bos).astype(np.uint16)
        self.lengths = rng.integers(MIN_PHRASE, MAX_PHRASE + 1, NUM_PHRASES)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        ranks = rng.choice(token_of_rank.size, self.lengths.sum(), p=zipf_probabilities(token_of_rank.size, 1.0, 3.0))
        self.tokens = token_of_rank[ranks]
        self.phrase_cdf = np.cumsum(zipf_probabilities(NUM_PHRASES, 1.1, 2.0))

    def fill(self, rng, n):
        """n tokens of concatenated phrases."""
        out = np.empty(n, dtype=np.uint16)
        mean_length = self.lengths.mean()
        pos = 0
        while pos < n:
            want = min(CHUNK_TOKENS, n - pos)
            ids = np.searchsorted(self.phrase_cdf, rng.random(int(want / mean_length * 1.2) + 16), side="right")
            ids = np.minimum(ids, NUM_PHRASES - 1)
            lengths = self.lengths[ids]
            ends = np.cumsum(lengths)
            keep = np.searchsorted(ends, want) + 1  # phrases needed to cover `want` tokens
            ids, lengths, ends = ids[:keep], lengths[:keep], ends[:keep]
            # token k of the chunk lies in phrase j at offset k - (ends[j] - lengths[j])
            index = np.repeat(self.offsets[ids] - (ends - lengths), lengths) + np.arange(ends[-1])
            got = min(want, ends[-1])
            out[pos:pos + got] = self.tokens[index[:got]]
            pos += got
        return out


def document_starts(rng, n):
    """Start positions of documents covering n tokens; the first is 0."""
    lengths = np.empty(0, dtype=np.int64)
    while lengths.sum() < n:
        more = rng.lognormal(np.log(DOC_MEDIAN), DOC_SIGMA, n // DOC_MEDIAN + 16)
        lengths = np.concatenate([lengths, np.clip(more, DOC_MIN, DOC_MAX).astype(np.int64)])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return starts[starts < n]


def make_shard(table, seed, index, n):
    """Shard `index` (0 = validation) of the stream of a seed: n tokens, documents starting with BOS."""
    rng = np.random.default_rng([seed, 1, index])
    tokens = table.fill(rng, n)
    tokens[document_starts(rng, n)] = BOS_ID
    return tokens


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic"),
                        help="output folder (default: data/synthetic)")
    # underscores as train_gpt.py spells its flags; the hyphenated spellings are aliases
    parser.add_argument("--train_shards", "--train-shards", type=int, default=6,
                        help="number of train shards (default 6: enough for the record's full 1490-step schedule)")
    parser.add_argument("--shard_tokens", "--shard-tokens", type=int, default=100_000_000,
                        help="tokens per train shard (default 100M)")
    parser.add_argument("--val_tokens", "--val-tokens", type=int, default=10_485_761,
                        help="tokens in the val shard (default 10,485,760 + 1, the record's full validation)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def argument_problem(args):
    """None if the arguments make a usable data set, else what is wrong."""
    if args.train_shards < 1:
        return f"--train_shards must be at least 1, not {args.train_shards}"
    for name in ("shard_tokens", "val_tokens"):
        value = getattr(args, name)
        if not 2 <= value <= MAX_SHARD_TOKENS:
            return (f"--{name} must lie between 2 and {MAX_SHARD_TOKENS:,} (a shard's header counts "
                    f"tokens in an int32), not {value:,}")
    if args.seed < 0:
        return f"--seed must be 0 or more, not {args.seed}"
    return None


def stale_shards(folder, names):
    """Shards in folder that a set of these names would not replace: with them the folder would pass
    for one data set while mixing two."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "fineweb_*.bin"))
                  if os.path.basename(p) not in names)


MEMORY_MARGIN = 256 * 2**20  # beyond a shard's own two bytes per token: the generator's chunks


class GenerationError(Exception):
    """Generation cannot go on; the message says why and what to do."""


def generate(args, paths):
    """Write every shard as a partial file, then give them their names together: an interruption leaves
    the folder's earlier set whole."""
    table = PhraseTable(args.seed)
    total, generating = 0, 0.0
    for index, path in enumerate(paths):  # index 0: validation
        n = args.val_tokens if index == 0 else args.shard_tokens
        t0 = time.perf_counter()
        try:
            tokens = make_shard(table, args.seed, index, n)
        except MemoryError:
            raise GenerationError(f"a shard of {n:,} tokens needs about {(2 * n + MEMORY_MARGIN) / 2**30:.1f} GiB "
                                  "of memory, more than this process may take: lower --shard_tokens / --val_tokens")
        generating += time.perf_counter() - t0
        try:
            write_partial(path, tokens)
        except OSError as e:
            raise GenerationError(f"cannot write {path} ({e.strerror}): check the folder and the free disk space")
        total += n
        print(f"generated {path} ({n:,} tokens)", flush=True)
    for path in paths:
        os.replace(partial_path(path), path)
    print(f"{total:,} tokens generated at {total / generating / 1e6:.1f}M tokens/s, all {len(paths)} shards in place")


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    problem = argument_problem(args)
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, args.train_shards + 1)]
    paths = [os.path.join(args.out, name) for name in names]
    if problem is None and os.path.exists(args.out) and not os.path.isdir(args.out):
        problem = f"--out {args.out} is a file, not a folder"
    stale = stale_shards(args.out, names) if problem is None and os.path.isdir(args.out) else []
    if stale:
        problem = (f"{args.out} holds {len(stale)} shard(s) this set would not replace ({stale[0]} ...): a mixture "
                   "would pass for one data set. Remove them, or choose another --out")
    if problem is None:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            problem = f"cannot create the folder {args.out} ({e.strerror})"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    for stale in glob.glob(os.path.join(args.out, ".fineweb_*.partial")):  # left by a run that was killed
        os.remove(stale)
    previous_handler = signal.signal(signal.SIGTERM, interrupted)  # kill as Ctrl-C: clean up, one line
    try:
        generate(args, paths)
    except KeyboardInterrupt:
        print("error: interrupted: no shard was changed", file=sys.stderr)
        return 130
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        remove_partials(paths)
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
