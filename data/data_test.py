"""Data pipeline tests (CPU): shard format, BOS-aligned loader, validation windows, bigram hash,
errors, the synthetic generator and the download script."""
import importlib.util
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))

import shard_format  # noqa: E402
import synthetic  # noqa: E402
import train_gpt as tg  # noqa: E402
from conftest import replaced  # noqa: E402

BOS = tg.BOS_ID


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "data", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- test shards whose documents say who they are ------------------------------------------------
# Document i is [BOS, i, i + 1, ...] (mod 50000), so every check below is independent of the loader.

def document(doc_id, length):
    return np.concatenate([[BOS], (doc_id + np.arange(length - 1)) % 50000]).astype(np.uint16)


def write_documents(path, first_id, lengths):
    synthetic.write_shard(path, np.concatenate([document(first_id + i, n) for i, n in enumerate(lengths)]))


@pytest.fixture
def shards(tmp_path):
    """Two train shards (documents 0.. and 20000..) with lengths 20..600, some over max_seq_len."""
    rng = np.random.default_rng(0)
    write_documents(tmp_path / "fineweb_train_000001.bin", 0, rng.integers(20, 600, 300))
    write_documents(tmp_path / "fineweb_train_000002.bin", 20000, rng.integers(20, 600, 500))
    return str(tmp_path / "fineweb_train_*.bin")


def draw(pattern, world_size, steps, stages):
    """Per step: all ranks' (inputs, targets, cu_seqlens, bigram) in slot order. stages: list of
    (first_step, (batch, max_seq_len)) with the first at step 0."""
    stage_at = dict(stages)
    batch, max_seq_len = stage_at[0]
    grad_accum = 8 // world_size
    gens = [tg.distributed_data_generator(pattern, batch, max_seq_len, grad_accum, rank, world_size, device="cpu")
            for rank in range(world_size)]
    out = []
    for step in range(steps):
        slots = [None] * 8
        for micro in range(grad_accum):
            for rank, gen in enumerate(gens):
                if micro == 0 and step in stage_at and step > 0:
                    batch_i = gen.send((*stage_at[step], grad_accum))
                else:
                    batch_i = next(gen)
                assert np.array_equal(batch_i.bigram_rows, batch_i.bigram_hash.numpy())
                slots[micro * world_size + rank] = [t.numpy() for t in batch_i[:4]]
        out.append(slots)
    return out


def documents_of(inputs, targets, cu_seqlens):
    """The documents of one slot as token arrays, the final target included: it extends the last
    document, or is a one-token document of its own when it is a BOS (cu_seqlens cannot show that
    one: its start, L, looks like padding)."""
    local = inputs.size
    bounds = sorted(set(cu_seqlens.tolist()) | {local})
    docs = [inputs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if targets[-1] == BOS:
        return docs + [targets[-1:]]
    docs[-1] = np.concatenate([docs[-1], targets[-1:]])
    return docs


STAGES = [(0, (8 * 512, 256)), (5, (8 * 1024, 384))]


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_training_batches_invariants(shards, world_size):
    steps = draw(shards, world_size, 14, STAGES)
    prev_id = None
    for step, slots in enumerate(steps):
        batch, max_seq_len = (STAGES[1] if step >= 5 else STAGES[0])[1]
        local = batch // 8
        step_ids = []
        for inputs, targets, cu, bigram in slots:
            assert inputs.dtype == np.int32 and targets.dtype == np.int64 and cu.dtype == np.int32
            assert inputs.shape == targets.shape == bigram.shape == (local,)
            assert cu.shape == (tg.max_num_docs(local),) and cu[0] == 0 and np.all(np.diff(cu) >= 0)
            assert np.array_equal(targets[:-1], inputs[1:])
            assert np.array_equal(bigram, tg.bigram_hash(inputs))
            assert inputs[0] == BOS
            for doc in documents_of(inputs, targets, cu):
                assert doc[0] == BOS and len(doc) <= max_seq_len
                if len(doc) == 1:  # a lone BOS: the next document, whose id is not in the batch
                    prev_id += 1
                    continue
                doc_id = int(doc[1])
                assert np.array_equal(doc, document(doc_id, len(doc)))  # an untouched prefix of its document
                if prev_id is not None and doc_id != prev_id + 1:
                    assert doc_id == 20000 and slots[0][0][1] == doc_id, "documents skipped outside a rollover"
                prev_id = doc_id
                step_ids.append(doc_id)
        assert all(i < 20000 for i in step_ids) or all(i >= 20000 for i in step_ids), "a step spans two shards"
    assert prev_id > 20000, "the test never rolled over to the second shard"


def test_same_stream_for_every_world_size(shards):
    streams = {}
    for world_size in (1, 2, 4, 8):
        steps = draw(shards, world_size, 12, STAGES)
        streams[world_size] = [np.concatenate([s[0] for s in slots]) for slots in steps]
    for world_size in (2, 4, 8):
        assert all(np.array_equal(a, b) for a, b in zip(streams[1], streams[world_size]))


def test_stage_change_only_at_step_end(shards):
    gen = tg.distributed_data_generator(shards, 8 * 512, 256, 4, 0, 2, device="cpu")
    next(gen)
    with pytest.raises(ValueError, match="last micro-step"):
        gen.send((8 * 1024, 256, 4))


def test_rewind_draws_again_what_a_fresh_reader_draws(shards):
    """Within the first shard and after leaving it: the pre-flight walks every draw with one reader."""
    fresh = tg.ShardReader(shards)
    first = fresh.next_step(64, 512)
    fresh.close()
    reader = tg.ShardReader(shards)
    for steps in (1, 60):  # 60 steps of 8 x 65 tokens leave the first shard (300 documents, lengths 20-600)
        for _ in range(steps):
            reader.next_step(64, 512)
        assert (reader.path != reader.files[0]) == (steps == 60)
        reader.rewind()
        assert reader.path == reader.files[0] and reader.next_step(64, 512) == first, steps
    reader.close()


def test_runs_out_of_training_data(shards):
    gen = tg.distributed_data_generator(shards, 8 * 4096, 2048, 8, device="cpu")
    with pytest.raises(tg.DataError, match=r"Ran out of training data.*fineweb_train_000002.bin.*cached_fineweb10B"):
        for _ in range(1000):
            next(gen)


def test_too_many_documents(tmp_path):
    write_documents(tmp_path / "fineweb_train_000001.bin", 0, [4] * 3000)
    gen = tg.distributed_data_generator(str(tmp_path / "*.bin"), 8 * 1024, 256, 8, device="cpu")
    with pytest.raises(tg.DataError, match="max_num_docs"):
        next(gen)


def test_cu_seqlens_fits_the_fullest_fineweb_micro_batches():
    """The most documents in one micro-batch over FineWeb's first 10 training shards (1.45M documents)."""
    for local_tokens, most_documents in ((16384, 56), (32768, 90), (49152, 121)):
        tg.check_doc_count(most_documents, local_tokens, "fineweb")


def test_no_files(tmp_path):
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(tg.DataError, match=r"No files match .*nothing_\*\.bin.*cached_fineweb10B\.py 9.*synthetic\.py"):
        next(tg.distributed_data_generator(pattern, 8 * 512, 256, 8, device="cpu"))


@pytest.mark.parametrize("corruption,message", [
    ("magic", "not a token shard"), ("version", "shard version 7"), ("truncate", "truncated or corrupt"),
    ("extra", "truncated or corrupt")])
def test_broken_shard(tmp_path, corruption, message):
    path = tmp_path / "fineweb_train_000001.bin"
    write_documents(path, 0, [100] * 50)
    raw = bytearray(path.read_bytes())
    if corruption == "magic":
        raw[0:4] = np.int32(1234).tobytes()
    elif corruption == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif corruption == "truncate":
        raw = raw[:-10]
    else:
        raw += b"\0\0"
    path.write_bytes(bytes(raw))
    with pytest.raises(tg.DataError, match=f"fineweb_train_000001.bin .*{message}.*Delete it"):
        next(tg.distributed_data_generator(str(path), 8 * 64, 64, 8, device="cpu"))


@pytest.mark.parametrize("bad_id", [50257, 50303, 65535])
def test_token_ids_outside_gpt2_vocabulary(tmp_path, bad_id):
    path = tmp_path / "fineweb_train_000001.bin"
    tokens = np.concatenate([document(i, 100) for i in range(50)])
    tokens[1234] = bad_id
    synthetic.write_shard(path, tokens)
    message = f"fineweb_train_000001.bin holds token id {bad_id} at position 1234: ids must be below 50257"
    with pytest.raises(tg.DataError, match=message):
        tg.load_shard(str(path))
    with pytest.raises(tg.DataError, match=message):
        next(tg.distributed_data_generator(str(path), 8 * 64, 64, 8, device="cpu"))


def test_short_file_is_not_a_shard(tmp_path):
    path = tmp_path / "fineweb_train_000001.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(tg.DataError, match=r"is too short to be a token shard \(100 bytes; the header alone is 1024\)"):
        tg.load_shard(str(path))


def test_shard_without_documents_among_good_ones(tmp_path):
    write_documents(tmp_path / "fineweb_train_000001.bin", 0, [100] * 20)
    synthetic.write_shard(tmp_path / "fineweb_train_000002.bin", np.arange(1, 5001, dtype=np.uint16))  # no BOS
    gen = tg.distributed_data_generator(str(tmp_path / "*.bin"), 8 * 64, 64, 8, device="cpu")
    with pytest.raises(tg.DataError, match=r"fineweb_train_000002.bin holds 0 BOS tokens \(50256\), so no complete "
                                           "document: every document must start with BOS"):
        for _ in range(100):
            next(gen)


# --- pre-flight ----------------------------------------------------------------------------------

@pytest.fixture
def small_run(tmp_path):
    """Two 1M-token synthetic train shards, a val shard of 2,097,153 tokens, and the arguments of a
    run on them (3 + 0 steps)."""
    synthetic.main(["--out", str(tmp_path), "--train_shards", "2", "--shard_tokens", "1000000",
                    "--val_tokens", str(tg.VAL_BATCH_TOKENS + 1)])
    return ["--train_files", str(tmp_path / "fineweb_train_*.bin"), "--val_files", str(tmp_path / "fineweb_val_*.bin"),
            "--val_tokens", str(tg.VAL_BATCH_TOKENS), "--num_scheduled_iterations", "3",
            "--num_extension_iterations", "0"]


def preflight(argv, world_size=1):
    return tg.preflight(tg.Run(tg.parse_args(argv)[0], world_size))


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_a_run_draws_the_same_step_on_every_world_size(small_run, world_size):
    """Run's loaders: a step's micro-batches over all ranks hold the tokens one process draws; the
    validation batches too."""
    hp = tg.parse_args(small_run)[0]

    def step_tokens(make_batches, world_size):
        runs = [tg.Run(hp, world_size, rank, "cpu") for rank in range(world_size)]
        batches = [batch for run in runs for batch, _ in zip(make_batches(run), range(run.grad_accum))]
        return sorted(batch.inputs.numpy().tobytes() for batch in batches)

    for make_batches in (lambda run: run.train_batches(tg.STAGES[1]), lambda run: run.val_batches(hp.val_tokens)):
        assert step_tokens(make_batches, world_size) == step_tokens(make_batches, 1)


def test_preflight_walks_exactly_what_the_loader_draws(small_run):
    """The pre-flight's verdict on 'enough data' is the loader's: it runs out at the same step."""
    reader = tg.ShardReader(small_run[1])  # the pre-flight's walk: 300 steps of stage 1
    with pytest.raises(tg.DataError, match=r"runs out at step (\d+) of 300") as failure:
        tg.walk_batches(reader, [tg.STAGES[0]] * 300, "")
    reader.close()
    runs_out_at = int(failure.value.args[0].split("runs out at step ")[1].split()[0])
    stage = tg.STAGES[0]  # steps 0-99 of a 300-step schedule
    gen = tg.distributed_data_generator(small_run[1], stage.batch_tokens, stage.max_seq_len, 8, device="cpu")
    for _ in range(runs_out_at * 8):
        next(gen)
    with pytest.raises(tg.OutOfTrainingData):
        next(gen)
    assert preflight(small_run)[0] == "plan: 3 steps, world size 1 (gradient accumulation 8)"


def test_preflight_counts_documents_as_the_micro_batches_will(small_run, tmp_path):
    (tmp_path / "short").mkdir()
    write_documents(tmp_path / "short" / "fineweb_train_000001.bin", 0, [4] * 250_000)
    pattern = str(tmp_path / "short" / "*.bin")
    message = r"fineweb_train_000001.bin: a micro-batch of 16384 tokens holds 4097 documents, more than the 127"
    with pytest.raises(tg.DataError, match=message):
        preflight(replaced(small_run, "--train_files", pattern))
    with pytest.raises(tg.DataError, match=message):  # what training would meet at its first step
        next(tg.distributed_data_generator(pattern, tg.STAGES[0].batch_tokens, tg.STAGES[0].max_seq_len, 8,
                                           device="cpu"))


def test_preflight_checks_every_file_before_training(small_run, tmp_path):
    write_documents(tmp_path / "fineweb_train_000003.bin", 0, [100] * 50)  # never reached by 3 steps
    with open(tmp_path / "fineweb_train_000003.bin", "r+b") as f:
        f.truncate(5000)
    with pytest.raises(tg.DataError, match=r"fineweb_train_000003.bin has 5000 bytes but its header promises 5000 "
                                           r"tokens \(11024 bytes\): truncated or corrupt. Delete it"):
        preflight(small_run)


def test_preflight_checks_token_ids_of_the_shards_used(small_run, tmp_path):
    path = tmp_path / "fineweb_train_000001.bin"
    tokens = tg.load_shard(str(path)).copy()
    tokens[777] = 60000
    synthetic.write_shard(path, tokens)
    with pytest.raises(tg.DataError, match="fineweb_train_000001.bin holds token id 60000 at position 777"):
        preflight(small_run)


def test_preflight_needs_enough_validation_tokens(small_run):
    with pytest.raises(tg.DataError, match=r"holds 2,097,153 tokens, fewer than the 4,194,304 \+ 1 that validation "
                                           r"reads: lower --val_tokens"):
        preflight(replaced(small_run, "--val_tokens", str(2 * tg.VAL_BATCH_TOKENS)))


def test_preflight_refuses_overlapping_train_and_val_files(small_run, tmp_path):
    with pytest.raises(tg.DataError, match=r"fineweb_train_000001.bin \(--train_files\) and .*fineweb_train_000001.bin "
                                           r"\(--val_files\) hold the same data .*validation would score training "
                                           r"tokens"):
        preflight(replaced(small_run, "--val_files", str(tmp_path / "fineweb_*.bin")))


LINKS = {"hard link": os.link, "symbolic link": os.symlink, "byte copy": lambda a, b: b.write_bytes(a.read_bytes())}


@pytest.mark.parametrize("make", LINKS)
def test_preflight_refuses_the_same_data_twice(small_run, tmp_path, make):
    (tmp_path / "t").mkdir()
    LINKS[make](tmp_path / "fineweb_val_000000.bin", tmp_path / "t" / "fineweb_train_000001.bin")
    with pytest.raises(tg.DataError, match=r"t/fineweb_train_000001.bin \(--train_files\) and .*fineweb_val_000000.bin "
                                           r"\(--val_files\) hold the same data \(one file, a link or a copy\): "
                                           "validation would score training tokens"):
        preflight(replaced(small_run, "--train_files", str(tmp_path / "t" / "*.bin")))
    LINKS[make](tmp_path / "fineweb_train_000001.bin", tmp_path / "fineweb_train_000003.bin")
    with pytest.raises(tg.DataError, match=r"fineweb_train_000001.bin and .*fineweb_train_000003.bin \(--train_files\) "
                                           "hold the same data .*: it would be read twice"):
        preflight(small_run)


def test_preflight_refuses_validation_data_without_documents(small_run, tmp_path):
    synthetic.write_shard(tmp_path / "fineweb_val_000000.bin", np.zeros(tg.VAL_BATCH_TOKENS + 1, np.uint16))
    with pytest.raises(tg.DataError, match=r"fineweb_val_000000.bin holds no BOS token \(50256\), so no document"):
        preflight(small_run)


def test_preflight_walks_the_validation_windows(small_run, tmp_path):
    """A window of 262,144 validation tokens may hold 767 documents; documents of 300 tokens make 874."""
    tokens = np.concatenate([document(i, 300) for i in range(7000)])
    synthetic.write_shard(tmp_path / "fineweb_val_000000.bin", tokens[:tg.VAL_BATCH_TOKENS + 1])
    message = r"fineweb_val_000000.bin: a micro-batch of 262144 tokens holds 874 documents, more than the 767"
    with pytest.raises(tg.DataError, match=message):
        preflight(small_run)
    files = tg.validation_files(small_run[3], tg.VAL_BATCH_TOKENS)
    with pytest.raises(tg.DataError, match=message):  # what the first validation would meet
        next(tg.validation_batches(files, tg.VAL_BATCH_TOKENS, tg.VAL_LOCAL_TOKENS, 8, device="cpu"))


def test_validation_names_the_file_of_a_window_with_too_many_documents(small_run, tmp_path):
    """Validation over two files: a window in the second (documents of 300 tokens, 874 in 262,144) is
    reported with that file's name, by the pre-flight and by the loader, which share the walk."""
    half = tg.VAL_BATCH_TOKENS // 2
    long_documents = np.concatenate([document(i, 2000) for i in range(half // 2000 + 1)])
    synthetic.write_shard(tmp_path / "fineweb_val_000000.bin", long_documents[:half])  # windows 0-3
    short_documents = np.concatenate([document(i, 300) for i in range(half // 300 + 1)])
    synthetic.write_shard(tmp_path / "fineweb_val_000001.bin", short_documents[:half + 1])  # windows 4-7
    message = r"fineweb_val_000001.bin: a micro-batch of 262144 tokens holds 874 documents"
    with pytest.raises(tg.DataError, match=message):
        preflight(small_run)
    files = tg.validation_files(small_run[3], tg.VAL_BATCH_TOKENS)
    with pytest.raises(tg.DataError, match=message):
        list(tg.validation_batches(files, tg.VAL_BATCH_TOKENS, tg.VAL_LOCAL_TOKENS, 8, device="cpu"))


def test_preflight_walks_the_draws_from_the_first_shard_at_later_shapes(small_run, tmp_path):
    """Training meets short documents at stage 1's and 2's shapes only; the compile workers and the CUDA
    graphs' capture draw stage 3's first micro-batch from the first shard, as profile_gpt.py --stage 3 does."""
    (tmp_path / "t").mkdir()
    write_documents(tmp_path / "t" / "fineweb_train_000001.bin", 0, [300] * 3000 + [2000] * 2500)
    args = replaced(small_run, "--train_files", str(tmp_path / "t" / "*.bin"), "--num_scheduled_iterations", "18")
    reader = tg.ShardReader(args[args.index("--train_files") + 1])
    before = tg.walk_batches(reader, [tg.Schedule(18, 0).stage(step) for step in range(18)], "")
    reader.close()
    assert before[1] > 1_000_000  # training's own draws pass
    with pytest.raises(tg.DataError, match=r"a micro-batch of 49152 tokens holds 164 documents, more than the 127"):
        preflight(args)


def test_running_out_explains_that_long_documents_are_cut(small_run):
    with pytest.raises(tg.DataError, match=r"runs out at step \d+ of 7: .*Each document is cut to the stage's "
                                           r"sequence length, 896/2048/2048 tokens, and the rest of it dropped"):
        preflight(replaced(small_run, "--num_scheduled_iterations", "7"))


def test_a_pipe_or_a_folder_is_no_shard(small_run, tmp_path):
    os.mkfifo(tmp_path / "fineweb_train_000000.bin")  # opening it to read would wait for a writer forever
    with pytest.raises(tg.DataError, match=r"fineweb_train_000000.bin is not a file but a pipe, socket or device. "
                                           "Give --train_files / --val_files patterns that match shard files only"):
        preflight(small_run)
    with pytest.raises(tg.DataError, match=r"is not a file but a folder. Give --train_files"):
        preflight(replaced(small_run, "--train_files", str(tmp_path) + "/"))


def test_validation_reads_only_the_files_it_needs(tmp_path):
    write_documents(tmp_path / "fineweb_val_000000.bin", 0, [257] * 32 + [1])
    (tmp_path / "fineweb_val_000001.bin").write_bytes(b"not a shard")
    pattern = str(tmp_path / "fineweb_val_*.bin")
    files = tg.validation_files(pattern, 8 * 1024)
    assert files == [str(tmp_path / "fineweb_val_000000.bin")]
    assert len(list(tg.validation_batches(files, 8 * 1024, 1024, 8, device="cpu"))) == 8
    # given more files than its tokens need (the warm-up's one batch from Run.val_files), it loads only those
    all_files = files + [str(tmp_path / "fineweb_val_000001.bin")]
    assert len(list(tg.validation_batches(all_files, 8 * 1024, 1024, 8, device="cpu"))) == 8
    with pytest.raises(tg.DataError, match=r"fineweb_val_000001.bin is too short to be a token shard \(11 bytes"):
        tg.validation_files(pattern, 16 * 1024)


def test_the_data_scripts_read_shards_as_train_gpt_does(tmp_path):
    """data/shard_format.py (torch-free, for the data scripts) and train_gpt.py's own reader agree on
    every constant and on the verdict for good and broken files."""
    for name in ("SHARD_MAGIC", "SHARD_VERSION", "HEADER_WORDS", "HEADER_BYTES", "BOS_ID", "GPT2_VOCAB_SIZE",
                 "SYNTHETIC_WORD", "SYNTHETIC_MARK"):
        assert getattr(shard_format, name) == getattr(tg, name), name
    synthetic.write_shard(tmp_path / "good.bin", np.arange(1000, dtype=np.uint16))
    raw = (tmp_path / "good.bin").read_bytes()
    header = np.frombuffer(raw[:tg.HEADER_BYTES], dtype="<i4").copy()
    broken = {"truncated.bin": raw[:-2], "short.bin": raw[:101], "empty.bin": b"",
              "magic.bin": np.concatenate([[7], header[1:]]).astype("<i4").tobytes() + raw[tg.HEADER_BYTES:],
              "version.bin": (np.concatenate([header[:1], [2], header[2:]]).astype("<i4").tobytes()
                              + raw[tg.HEADER_BYTES:])}
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
    os.mkdir(tmp_path / "folder.bin")
    os.mkfifo(tmp_path / "pipe.bin")
    os.symlink("nowhere", tmp_path / "dangling.bin")
    verdicts = {p.name: tg.shard_problem(str(p)) for p in tmp_path.iterdir()}
    assert verdicts == {p.name: shard_format.shard_problem(str(p)) for p in tmp_path.iterdir()}
    assert verdicts["good.bin"] is None and all(v for name, v in verdicts.items() if name != "good.bin"), verdicts


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50257, 12345).astype(np.uint16)
    path = tmp_path / "x.bin"
    synthetic.write_shard(path, tokens)
    assert path.stat().st_size == tg.HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, tokens.size]
    assert tg.shard_problem(str(path)) is None
    assert np.array_equal(tg.load_shard(str(path)), tokens)


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_validation_windows(tmp_path, world_size):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 50000, 40000).astype(np.uint16)
    tokens[rng.choice(40000, 90, replace=False)] = BOS
    synthetic.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    local, val_tokens, grad_accum = 1024, 2 * 8 * 1024, 8 // world_size
    files = tg.validation_files(str(tmp_path / "fineweb_val_*.bin"), val_tokens)
    gens = [tg.validation_batches(files, val_tokens, local, grad_accum, rank, world_size, device="cpu")
            for rank in range(world_size)]
    for step in range(2):
        for micro in range(grad_accum):
            for rank, gen in enumerate(gens):
                inputs, targets, cu, bigram = [t.numpy() for t in next(gen)[:4]]
                start = step * 8 * local + (micro * world_size + rank) * local
                assert np.array_equal(inputs, tokens[start:start + local])
                assert np.array_equal(targets, tokens[start + 1:start + local + 1])
                starts = sorted(set([0] + np.flatnonzero(inputs == BOS).tolist()))
                assert cu.tolist() == starts + [local] * (tg.max_num_docs(local) - len(starts))
                assert np.array_equal(bigram, tg.bigram_hash(inputs))
    assert all(next(gen, None) is None for gen in gens)


def test_validation_needs_enough_tokens(tmp_path):
    synthetic.write_shard(tmp_path / "fineweb_val_000000.bin", np.full(8 * 1024, BOS, dtype=np.uint16))
    with pytest.raises(tg.DataError, match=r"fewer than the 8,192 \+ 1.*--val_tokens"):
        tg.validation_files(str(tmp_path / "*.bin"), 8 * 1024)


# --- bigram hash ---------------------------------------------------------------------------------

def reference_bigram_hash(x):
    def wrap32(v):
        return (v + 2**31) % 2**32 - 2**31
    mod = tg.BIGRAM_VOCAB_SIZE - 1
    prev = [mod] + [int(v) for v in x[1:-1]]
    h = [mod]
    for i in range(1, len(x)):
        h.append((wrap32(36313 * int(x[i])) ^ wrap32(27191 * prev[i - 1])) % mod)
    return np.array(h)


def test_bigram_hash_example():
    assert tg.bigram_hash(np.array([50256, 100], dtype=np.int32)).tolist() == [251519, 223063]


def test_bigram_hash_matches_reference():
    x = np.random.default_rng(3).integers(0, 50304, 5000).astype(np.int32)
    x[:3] = [50256, 50303, 65535 // 2]
    h = tg.bigram_hash(x)
    assert h.dtype == np.int32 and np.array_equal(h, reference_bigram_hash(x))
    assert (h >= 0).all() and (h < tg.BIGRAM_VOCAB_SIZE).all()


# --- synthetic shards ----------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_fineweb_like():
    table = synthetic.PhraseTable(seed=5)
    a = synthetic.make_shard(table, 5, 1, 2_000_000)
    assert np.array_equal(a, synthetic.make_shard(synthetic.PhraseTable(seed=5), 5, 1, 2_000_000))
    assert not np.array_equal(a, synthetic.make_shard(synthetic.PhraseTable(seed=6), 6, 1, 2_000_000))
    assert a[0] == BOS and a.max() < 50257
    lengths = np.diff(np.flatnonzero(a == BOS))
    assert 330 < np.median(lengths) < 470 and lengths.min() >= 32 and (lengths > 2000).mean() > 0.02


def test_synthetic_tokens_are_learnable():
    """A bigram model fitted on 1.5M tokens predicts held-out tokens far better than log(vocab)."""
    tokens = synthetic.make_shard(synthetic.PhraseTable(seed=0), 0, 1, 2_000_000).astype(np.int64)
    train, held_out = tokens[:1_500_000], tokens[1_500_000:]
    pair_counts = {}
    keys, counts = np.unique(train[:-1] * 50257 + train[1:], return_counts=True)
    pair_counts = dict(zip(keys.tolist(), counts.tolist()))
    prev_counts = np.bincount(train[:-1], minlength=50257)
    unigram = (np.bincount(train, minlength=50257) + 1) / (train.size + 50257)
    pairs = (held_out[:-1] * 50257 + held_out[1:]).tolist()
    bigram = np.array([pair_counts.get(p, 0) for p in pairs]) / np.maximum(prev_counts[held_out[:-1]], 1)
    probs = 0.9 * bigram + 0.1 * unigram[held_out[1:]]
    assert -np.log(probs).mean() < 0.5 * np.log(50257)


def test_synthetic_cli_output_feeds_the_loader(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--train_shards", "2", "--shard_tokens", "300000",
                    "--val_tokens", str(2 * 8 * 1024 + 1), "--seed", "3"])
    gen = tg.distributed_data_generator(str(tmp_path / "fineweb_train_*.bin"), 8 * 2048, 896, 8, device="cpu")
    for _ in range(40):  # crosses into the second shard
        inputs, targets, cu = next(gen)[:3]
        assert inputs[0] == BOS and (inputs[cu[:-1][cu[:-1] < inputs.numel()].long()] == BOS).all()
    val_files = tg.validation_files(str(tmp_path / "fineweb_val_*.bin"), 2 * 8 * 1024)
    val = list(tg.validation_batches(val_files, 2 * 8 * 1024, 1024, 8, device="cpu"))
    assert len(val) == 16


@pytest.mark.parametrize("args,message", [
    (["--train_shards", "0"], "--train_shards must be at least 1, not 0"),
    (["--train_shards", "-2"], "--train_shards must be at least 1, not -2"),
    (["--shard_tokens", "0"], "--shard_tokens must lie between 2 and 2,147,483,647 (a shard's header counts tokens"),
    (["--shard_tokens", "-5"], "--shard_tokens must lie between 2 and 2,147,483,647"),
    (["--shard_tokens", str(10**12)], "--shard_tokens must lie between 2 and 2,147,483,647 (a shard's header counts "
                                      "tokens in an int32), not 1,000,000,000,000"),
    (["--val_tokens", str(2**31)], "--val_tokens must lie between 2 and 2,147,483,647"),
    (["--seed", "-1"], "--seed must lie between 0 and 2,147,483,646 (the shards' headers keep it), not -1"),
    (["--seed", str(2**31 - 1)], "--seed must lie between 0 and 2,147,483,646"),
])
def test_synthetic_bad_arguments(tmp_path, capsys, args, message):
    assert synthetic.main(["--out", str(tmp_path / "out")] + args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_synthetic_output_folder_problems(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert synthetic.main(["--out", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'file'} is a file, not a folder\n"
    assert synthetic.main(["--out", str(tmp_path / "file" / "sub")]) == 1
    assert capsys.readouterr().err == f"error: cannot create the folder {tmp_path / 'file' / 'sub'} (Not a directory)\n"


def test_synthetic_write_failure_leaves_nothing_behind(tmp_path):
    """A write cut short (here by a 1 MB file-size limit, as a full disk would) is one error line, and
    neither the shard's name nor a partial file is left on disk."""
    import subprocess
    code = ("import resource, signal, sys; sys.path.insert(0, sys.argv[1]); import synthetic; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "sys.exit(synthetic.main(['--out', sys.argv[2], '--val_tokens', '3000000', '--train_shards', '1']))")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "data"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr == (f"error: cannot write {tmp_path / 'fineweb_val_000000.bin'} "
                                                  "(File too large): check the folder and the free disk space\n")
    assert os.listdir(tmp_path) == []


def test_synthetic_takes_the_hyphenated_spellings_too():
    parser = synthetic.build_parser()
    assert parser.parse_args(["--train-shards", "2", "--shard-tokens", "7", "--val-tokens", "9"]) == \
        parser.parse_args(["--train_shards", "2", "--shard_tokens", "7", "--val_tokens", "9"])


def test_synthetic_refuses_to_mix_sets_and_removes_stale_partials(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--train_shards", "2", "--shard_tokens", "1000",
                           "--val_tokens", "1000"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert synthetic.main(["--out", str(tmp_path), "--train_shards", "1", "--seed", "1"]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path} holds 1 shard(s) this set would not replace "
                                       "(fineweb_train_000002.bin ...): a mixture would pass for one data set. "
                                       "Remove them, or choose another --out\n")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / ".fineweb_train_000009.bin.partial").write_bytes(b"left by a killed run")
    assert synthetic.main(["--out", str(tmp_path), "--train_shards", "2", "--shard_tokens", "1000",
                           "--val_tokens", "1000", "--seed", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def run_synthetic(tmp_path, args, setup="pass"):
    import subprocess
    # Ctrl-C's handler installed in the child: a shell starts background jobs with SIGINT ignored
    code = (f"import resource, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.path.insert(0, sys.argv[1]); import synthetic; {setup}; sys.exit(synthetic.main(sys.argv[2:]))")
    return subprocess.Popen([sys.executable, "-c", code, os.path.join(ROOT, "data"), "--out", str(tmp_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_synthetic_interrupted_is_one_line_and_changes_nothing(tmp_path, signum):
    import signal
    synthetic.main(["--out", str(tmp_path), "--train_shards", "1", "--shard_tokens", "1000", "--val_tokens", "1000"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    process = run_synthetic(tmp_path, ["--train_shards", "1", "--shard_tokens", "300000000", "--seed", "1"])
    assert process.stdout.readline().startswith("generated")  # the val shard; the train shard takes seconds
    process.send_signal(getattr(signal, signum))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == "error: interrupted: no shard was changed\n", err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("args,message", [
    (["--train-shard", "2"], "unrecognized arguments: --train-shard 2"),  # no abbreviations: a typo is an error
    (["--shard", "2"], "unrecognized arguments: --shard 2"),
])
def test_synthetic_takes_whole_flag_names(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path), *args])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: {message} (python data/synthetic.py --help lists the flags)\n"
    assert os.listdir(tmp_path) == []


def test_synthetic_keeps_a_set_that_is_in_place(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--train_shards", "1", "--shard_tokens", "1000", "--val_tokens", "1000"]
    assert synthetic.main(args) == 0
    made = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert synthetic.main(args) == 0
    assert capsys.readouterr().out == f"{tmp_path} holds this set already (seed 0, the same shards): nothing to do\n"
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == made
    assert synthetic.main(args + ["--seed", "1"]) == 0  # another set: written
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} != {name: data for name, (_, data) in made.items()}


def test_synthetic_checks_the_free_space_first(tmp_path, capsys):
    """A billion shards: refused at once from the disk's free space, not after building a billion names."""
    assert synthetic.main(["--out", str(tmp_path / "new"), "--train_shards", "1000000000"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: the set takes 186,265,468\.6 GiB and \S+ has [0-9,.]+ GiB free: lower "
                        r"--train_shards / --shard_tokens, or choose another --out\n", err), err
    assert not os.path.exists(tmp_path / "new")


def test_synthetic_says_how_much_memory_a_shard_needs(tmp_path):
    process = run_synthetic(tmp_path, ["--train_shards", "1", "--shard_tokens", "2000000000", "--val_tokens", "1000"],
                            setup="resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and err == ("error: a shard of 2,000,000,000 tokens needs about 4.0 GiB of memory, "
                                               "more than this process may take: lower --shard_tokens / --val_tokens\n")
    assert os.listdir(tmp_path) == []


def test_synthetic_defaults_cover_the_record_schedule(tmp_path):
    """The default shards hold what the 1490-step schedule draws, BOS-alignment waste included,
    measured by walking a sample shard with each stage's batch and max_seq_len."""
    defaults = synthetic.build_parser().parse_args([])
    table = synthetic.PhraseTable(defaults.seed)
    synthetic.write_shard(tmp_path / "sample.bin", synthetic.make_shard(table, defaults.seed, 1, 12_000_000))
    shard = tg.ShardReader(str(tmp_path / "sample.bin"))
    needed = 0
    for steps, batch, max_seq_len in ((483, 131072, 896), (484, 262144, 2048), (523, 393216, 2048)):
        cursor = 0
        for _ in range(20):
            _, cursor = tg.plan_step(shard, cursor, batch // 8, max_seq_len)
        needed += steps * shard.bos[cursor] / 20
    # each rollover drops at most one step of the old shard
    needed += defaults.train_shards * 393216 * 1.2
    assert defaults.train_shards * defaults.shard_tokens > 1.05 * needed
    assert defaults.val_tokens == 10_485_760 + 1


# --- download script (the hub replaced by a fake) ------------------------------------------------

GOOD_SHARD = np.full(1000, BOS, dtype=np.uint16)  # what the fake hub serves for every name


@pytest.fixture
def download(monkeypatch, tmp_path_factory):
    """The download script with a fake hub: each hf_hub_download call writes the next outcome ('good'
    by default, 'corrupt' = truncated) or raises it, and is recorded; the hub's records are the good
    shard's size and SHA-256."""
    module = load_script("cached_fineweb10B")
    calls, outcomes = [], []
    reference = tmp_path_factory.mktemp("hub") / "good.bin"
    synthetic.write_shard(reference, GOOD_SHARD)
    record = (reference.stat().st_size, module.sha256_of(reference))

    def fake_hf_hub_download(repo_id, filename, repo_type, local_dir):
        calls.append((repo_id, filename, repo_type))
        outcome = outcomes.pop(0) if outcomes else "good"
        if isinstance(outcome, Exception):
            raise outcome
        path = os.path.join(local_dir, filename)
        synthetic.write_shard(path, GOOD_SHARD)
        if outcome in ("corrupt", "cut"):
            with open(path, "r+b") as f:
                f.truncate(1500)
        if outcome == "cut":
            raise ConnectionError("connection reset while downloading")
        return path

    monkeypatch.setattr(module, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(module, "hub_records", lambda names: {name: record for name in names})
    return module, calls, outcomes


def test_download_fetches_val_and_train_then_skips_valid_files(download, tmp_path, capsys):
    module, calls, _ = download
    assert module.main(["2", "--local-dir", str(tmp_path)]) == 0
    assert [c[1] for c in calls] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert all(c[0] == "kjj0/fineweb10B-gpt2" and c[2] == "dataset" for c in calls)
    assert sorted(os.listdir(tmp_path)) == ["fineweb_train_000001.bin", "fineweb_train_000002.bin",
                                            "fineweb_val_000000.bin"]  # no staging folders left
    assert all(tg.shard_problem(str(p)) is None for p in tmp_path.iterdir())
    calls.clear()
    assert module.main(["2", "--local-dir", str(tmp_path)]) == 0
    assert calls == [] and "3 already there, all verified against the hub" in capsys.readouterr().out


def test_download_refetches_corrupt_files(download, tmp_path):
    module, calls, outcomes = download
    synthetic.write_shard(tmp_path / "fineweb_val_000000.bin", np.zeros(10, dtype=np.uint16))
    with open(tmp_path / "fineweb_val_000000.bin", "r+b") as f:
        f.truncate(1030)  # a corrupt copy left by something else
    outcomes.extend(["corrupt", "good"])
    assert module.main(["1", "--local-dir", str(tmp_path)]) == 0
    assert [c[1] for c in calls] == ["fineweb_val_000000.bin"] * 2 + ["fineweb_train_000001.bin"]
    assert all(tg.shard_problem(str(p)) is None for p in tmp_path.iterdir())


def test_download_replaces_a_well_formed_shard_that_is_not_the_hubs(download, tmp_path):
    module, calls, _ = download
    synthetic.write_shard(tmp_path / "fineweb_val_000000.bin", np.full_like(GOOD_SHARD, 7))  # same size, other tokens
    assert module.main(["0", "--local-dir", str(tmp_path)]) == 0
    assert [c[1] for c in calls] == ["fineweb_val_000000.bin"]
    assert np.array_equal(tg.load_shard(str(tmp_path / "fineweb_val_000000.bin")), GOOD_SHARD)


def test_download_gives_up_on_a_file_that_stays_corrupt(download, tmp_path, capsys):
    module, calls, outcomes = download
    outcomes.extend(["corrupt"] * 3)
    assert module.main(["1", "--local-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is tqdm's bar
    assert len(calls) == 3 and len(errors) == 1 and "Traceback" not in err
    assert "fineweb_val_000000.bin is still corrupt after 3 downloads" in errors[0]
    assert os.listdir(tmp_path) == [], "a corrupt download must not be left under its name"


def test_download_cut_short_leaves_nothing(download, tmp_path, capsys):
    module, _, outcomes = download
    outcomes.append("cut")
    assert module.main(["1", "--local-dir", str(tmp_path)]) == 1
    assert "connection reset while downloading. Check the network" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_download_unreachable_hub_is_one_line(download, tmp_path, capsys):
    module, _, outcomes = download
    outcomes.append(ConnectionError("Failed to resolve 'huggingface.co'.\nmore details"))
    assert module.main(["1", "--local-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "more details" not in err
    assert errors[0] == ("error: could not download fineweb_val_000000.bin from the Hugging Face Hub "
                         "(kjj0/fineweb10B-gpt2): ConnectionError: Failed to resolve 'huggingface.co'. Check the "
                         "network (or HF_ENDPOINT) and run this again.")


def test_download_offline_names_a_corrupt_local_file(download, tmp_path, capsys, monkeypatch):
    module, calls, _ = download
    monkeypatch.setattr(module.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(module, "hub_records", lambda names: None)
    synthetic.write_shard(tmp_path / "fineweb_val_000000.bin", GOOD_SHARD)
    with open(tmp_path / "fineweb_val_000000.bin", "r+b") as f:
        f.truncate(1500)
    assert module.main(["0", "--local-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {tmp_path / 'fineweb_val_000000.bin'} has 1500 bytes but its header promises 1000 tokens "
        "(3024 bytes): truncated or corrupt, and HF_HUB_OFFLINE is set, so it cannot be fetched again: delete it "
        "and run this online.")
    assert calls == []


def test_download_offline_without_local_files_leaves_no_folder(download, tmp_path, capsys, monkeypatch):
    module, calls, _ = download
    monkeypatch.setattr(module.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(module, "hub_records", lambda names: None)
    assert module.main(["1", "--local-dir", str(tmp_path / "fineweb10B")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {tmp_path / 'fineweb10B' / 'fineweb_val_000000.bin'} is not there, and HF_HUB_OFFLINE is set, so it "
        "cannot be fetched: unset HF_HUB_OFFLINE and run this online.")
    assert calls == [] and not (tmp_path / "fineweb10B").exists()


def test_download_local_dir_that_is_a_file(download, tmp_path, capsys):
    module = download[0]
    (tmp_path / "f").write_text("x")
    assert module.main(["1", "--local-dir", str(tmp_path / "f")]) == 1
    assert capsys.readouterr().err == f"error: cannot use --local-dir {tmp_path / 'f'} as a folder (File exists)\n"


def test_download_help_explains_the_argument(download, capsys):
    module = download[0]
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "default 103" in out and "needs 9" in out
