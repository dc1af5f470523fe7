"""Fetch the GPT-2-tokenized FineWeb shards from the Hugging Face Hub into data/fineweb10B/.

    python data/cached_fineweb10B.py [N]

fetches the validation shard and train shards 1..N (default 103, all of them; each holds 100M
tokens). The speedrun record needs N = 9 (900M tokens). Files already present and valid are
skipped; every file's header and size are checked after download, and a corrupt file is fetched
again.
"""
import argparse
import os
import sys

from huggingface_hub import hf_hub_download
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_gpt import shard_problem  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"
LOCAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")
ALL_TRAIN_SHARDS = 103
ATTEMPTS = 3


class DownloadError(Exception):
    pass


def fetch(name, local_dir):
    """Download one shard unless a valid copy is there; retry a corrupt download."""
    path = os.path.join(local_dir, name)
    if os.path.exists(path) and shard_problem(path) is None:
        return "present"
    for _ in range(ATTEMPTS):
        try:
            hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=local_dir,
                            force_download=os.path.exists(path))
        except Exception as e:  # the hub client raises many types; all mean the same to the user
            raise DownloadError(f"could not download {name} from the Hugging Face Hub ({REPO_ID}): "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}. "
                                "Check the network (or HF_ENDPOINT) and run this again.") from None
        problem = shard_problem(path)
        if problem is None:
            return "downloaded"
    raise DownloadError(f"{name} is still corrupt after {ATTEMPTS} downloads: it {problem}.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train_shards", nargs="?", type=int, default=ALL_TRAIN_SHARDS,
                        help=f"train shards to fetch, 1..N (default {ALL_TRAIN_SHARDS} = all; the record needs 9)")
    parser.add_argument("--local-dir", default=LOCAL_DIR, help="where to put the shards (default data/fineweb10B)")
    args = parser.parse_args(argv)
    if not 0 <= args.num_train_shards <= ALL_TRAIN_SHARDS:
        parser.error(f"N must be between 0 and {ALL_TRAIN_SHARDS}")
    os.makedirs(args.local_dir, exist_ok=True)
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, args.num_train_shards + 1)]
    counts = {"present": 0, "downloaded": 0}
    try:
        for name in tqdm(names, desc="FineWeb shards", unit="file"):
            counts[fetch(name, args.local_dir)] += 1
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(names)} shards in {args.local_dir}: {counts['downloaded']} downloaded, {counts['present']} already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
