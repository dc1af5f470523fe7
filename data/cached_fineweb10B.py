"""Fetch the GPT-2-tokenized FineWeb shards from the Hugging Face Hub into data/fineweb10B/.

    python data/cached_fineweb10B.py [N]

fetches the validation shard and train shards 1..N (default 103, all of them, about 20 GB; each
holds 100M tokens, 200 MB). The speedrun record needs N = 9 (900M tokens, about 2 GB). A file
already present is kept only if its size and SHA-256 match the hub's record (offline, with
HF_HUB_OFFLINE=1, only if it is a well-formed shard). Downloads land under their final name only
once complete and verified.
"""
import argparse
import hashlib
import os
import sys
import tempfile

from huggingface_hub import HfApi, constants, hf_hub_download
from tqdm import tqdm

from shard_format import shard_problem  # beside this script: Python puts its folder on the path

REPO_ID = "kjj0/fineweb10B-gpt2"
LOCAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")
ALL_TRAIN_SHARDS = 103
ATTEMPTS = 3


class DownloadError(Exception):
    pass


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else "no details"


def hub_records(names):
    """{name: (size, sha256)} as the hub records them; None when offline (HF_HUB_OFFLINE=1)."""
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        infos = HfApi().get_paths_info(REPO_ID, names, repo_type="dataset")
    except Exception as e:  # the hub client raises many types; all mean the same to the user
        raise DownloadError(f"could not read the file list of {REPO_ID} from the Hugging Face Hub "
                            f"({type(e).__name__}: {first_line(e)}). Check the network (or HF_ENDPOINT) and run "
                            "this again.") from None
    return {info.path: (info.size, info.lfs.sha256 if info.lfs else None) for info in infos}


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_problem(path, record):
    """None if the file at path is the shard the hub records (record = (size, sha256), or None when
    offline: then any well-formed shard passes), else what is wrong with it."""
    problem = shard_problem(path)
    if problem or record is None:
        return problem
    size, sha256 = record
    if os.path.getsize(path) != size:
        return f"has {os.path.getsize(path)} bytes where the hub's copy has {size}"
    if sha256 and sha256_of(path) != sha256:
        return "is not the hub's copy (its SHA-256 differs): a synthetic or foreign shard"
    return None


def fetch(name, local_dir, record):
    """Download one shard unless the right one is there; retry a corrupt download. The download
    goes to a hidden folder and is moved to its name only when verified."""
    path = os.path.join(local_dir, name)
    if os.path.exists(path):
        problem = file_problem(path, record)
        if problem is None:
            return "present"
        if constants.HF_HUB_OFFLINE:
            raise DownloadError(f"{path} {problem}, and HF_HUB_OFFLINE is set, so it cannot be fetched again: "
                                "delete it and run this online.")
    elif constants.HF_HUB_OFFLINE:
        raise DownloadError(f"{path} is not there, and HF_HUB_OFFLINE is set, so it cannot be fetched: unset "
                            "HF_HUB_OFFLINE and run this online.")
    for _ in range(ATTEMPTS):
        with tempfile.TemporaryDirectory(dir=local_dir, prefix=".download-") as staging:
            try:
                downloaded = hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=staging)
            except Exception as e:  # the hub client raises many types; all mean the same to the user
                raise DownloadError(f"could not download {name} from the Hugging Face Hub ({REPO_ID}): "
                                    f"{type(e).__name__}: {first_line(e)}. Check the network (or HF_ENDPOINT) "
                                    "and run this again.") from None
            problem = file_problem(downloaded, record)
            if problem is None:
                os.replace(downloaded, path)
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
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, args.num_train_shards + 1)]
    counts = {"present": 0, "downloaded": 0}
    created = not os.path.exists(args.local_dir)
    try:
        try:
            os.makedirs(args.local_dir, exist_ok=True)
        except OSError as e:
            raise DownloadError(f"cannot use --local-dir {args.local_dir} as a folder ({e.strerror})") from None
        records = hub_records(names)
        for name in tqdm(names, desc="FineWeb shards", unit="file"):
            counts[fetch(name, args.local_dir, None if records is None else records.get(name))] += 1
    except DownloadError as e:
        if created and os.path.isdir(args.local_dir) and not os.listdir(args.local_dir):
            os.rmdir(args.local_dir)  # nothing fetched: leave no empty folder behind
        print(f"error: {e}", file=sys.stderr)
        return 1
    checked = "verified against the hub" if records is not None else "well-formed (offline: not verified)"
    print(f"{len(names)} shards in {args.local_dir}: {counts['downloaded']} downloaded, {counts['present']} already "
          f"there, all {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
