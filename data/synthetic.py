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
import shutil
import signal
import sys
import time

import numpy as np

from shard_format import (BOS_ID, GPT2_VOCAB_SIZE, HEADER_WORDS, SHARD_MAGIC, SHARD_VERSION,  # beside this script
                          SYNTHETIC_MARK, SYNTHETIC_WORD, shard_problem)

NUM_PHRASES, MIN_PHRASE, MAX_PHRASE = 32768, 2, 12
DOC_MEDIAN, DOC_SIGMA, DOC_MIN, DOC_MAX = 400, 1.0, 32, 32768
CHUNK_TOKENS = 1 << 23  # tokens expanded at once: bounds memory to a few hundred MB
MAX_SHARD_TOKENS = 2**31 - 1  # the header's token count is an int32
SEED_WORD = SYNTHETIC_WORD + 1  # header word of a generated shard's seed + 1 (0: not generated from a seed)
MAX_SEED = 2**31 - 2  # so that seed + 1 fits that int32


def partial_path(path):
    """The hidden file a shard is written into before it takes its name."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")


def write_partial(path, tokens, seed=None):
    """Write uint16 tokens with the 256-word int32 header (magic, version, count, the synthetic mark, the
    seed + 1 it was generated from) into path's partial file; on failure, remove it."""
    tokens = np.asarray(tokens, dtype="<u2")
    if tokens.size > MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens, not {tokens.size}")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    header[SYNTHETIC_WORD] = SYNTHETIC_MARK
    header[SEED_WORD] = 0 if seed is None else seed + 1
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


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 1, as every other error here
        print(f"error: {message} (python data/synthetic.py --help lists the flags)", file=sys.stderr)
        sys.exit(1)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)  # "--train-shard 2" is a typo, not --train_shards
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
    if not 0 <= args.seed <= MAX_SEED:
        return f"--seed must lie between 0 and {MAX_SEED:,} (the shards' headers keep it), not {args.seed}"
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
            write_partial(path, tokens, args.seed)
        except OSError as e:
            raise GenerationError(f"cannot write {path} ({e.strerror}): check the folder and the free disk space")
        total += n
        print(f"generated {path} ({n:,} tokens)", flush=True)
    for path in paths:
        os.replace(partial_path(path), path)
    print(f"{total:,} tokens generated at {total / generating / 1e6:.1f}M tokens/s, all {len(paths)} shards in place")


def interrupted(signum, frame):
    raise KeyboardInterrupt


def set_bytes(args):
    """The bytes of the set on disk: each shard's header and two bytes a token."""
    return (args.train_shards + 1) * 4 * HEADER_WORDS + 2 * (args.val_tokens + args.train_shards * args.shard_tokens)


def space_problem(args):
    """None if the disk under --out holds the set (the shards it replaces count as free), else what is wrong."""
    existing = os.path.abspath(args.out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    replaced = sum(os.path.getsize(p) for p in glob.glob(os.path.join(args.out, "fineweb_*.bin")))
    free = shutil.disk_usage(existing).free + replaced
    if set_bytes(args) > free:
        return (f"the set takes {set_bytes(args) / 2**30:,.1f} GiB and {existing} has {free / 2**30:,.1f} GiB free: "
                "lower --train_shards / --shard_tokens, or choose another --out")
    return None


def set_in_place(args, paths):
    """Whether every shard of the set is there as this script generates it: same seed, same sizes."""
    for index, path in enumerate(paths):
        if shard_problem(path) is not None:
            return False
        header = np.fromfile(path, dtype="<i4", count=SEED_WORD + 1)
        tokens = args.val_tokens if index == 0 else args.shard_tokens
        if (header[2], header[SYNTHETIC_WORD], header[SEED_WORD]) != (tokens, SYNTHETIC_MARK, args.seed + 1):
            return False
    return True


def main(argv=None):
    args = build_parser().parse_args(argv)
    problem = argument_problem(args)
    if problem is None and os.path.exists(args.out) and not os.path.isdir(args.out):
        problem = f"--out {args.out} is a file, not a folder"
    problem = problem or space_problem(args)  # before the shards' names: a billion of them fill the memory
    names = [] if problem else (["fineweb_val_000000.bin"] +
                                [f"fineweb_train_{i:06d}.bin" for i in range(1, args.train_shards + 1)])
    paths = [os.path.join(args.out, name) for name in names]
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
    if set_in_place(args, paths):
        print(f"{args.out} holds this set already (seed {args.seed}, the same shards): nothing to do")
        return 0
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
