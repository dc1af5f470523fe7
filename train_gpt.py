"""Single-file GPT speedrun: train a GPT-2-small-class model on FineWeb to <= 3.28 val loss.

Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py
Importing this file runs and changes nothing (prepare calls configure_torch), so tests and
profile_gpt.py (the profiler) can import its pieces.

Sections, in file order, with where to start reading each:
  Data       load_shard, ShardReader, distributed_data_generator, validation_batches
  Kernels    transpose_copy, ReLUSquareMLP, QKVHeads, FP8SoftcapMTPLoss, EmbeddingRows
  Model      LAYERS, Rotary, attention, GPT
  Optimizer  nesterov_polar_express, PARAM_GROUPS, NorMuonAdam
  Schedule   STAGES, Schedule
  Main       parse_args, prepare, Trainer, warm_up, capture_graphs, train, main
"""
import argparse
import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import glob
import hashlib
import itertools
import math
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np
import torch
import torch._functorch.config
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from torch import nn
from torch._dynamo.utils import counters

# ----------------------------------------------------------------------------------------------
# Data
#
# Shards: 256 int32 header words (magic, version, token count, ...) then uint16 tokens. Every
# document begins with BOS. Training batches are BOS-aligned and drawn identically for every
# world size: a step is 8 slots of L + 1 tokens (L = batch / 8); slot j goes to micro-step
# j // world_size on rank j % world_size.

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256
SYNTHETIC_WORD, SYNTHETIC_MARK = 3, 0x53594E54  # header word 3 of data/synthetic.py's shards (FineWeb's: 0)
HEADER_BYTES = 4 * HEADER_WORDS
BOS_ID = 50256
GPT2_VOCAB_SIZE = 50257  # a shard's token ids lie below this
VOCAB_SIZE = 50304  # 50257 padded to a multiple of 128
BIGRAM_ROWS_PER_TOKEN = 5  # the bigram table's rows, per vocabulary entry
BIGRAM_VOCAB_SIZE = BIGRAM_ROWS_PER_TOKEN * VOCAB_SIZE
SLOTS_PER_STEP = 8  # world_size * grad_accum_steps, for every world size
SYNC_BOS_INDEX_TOKENS = 6_000_000  # a fresh shard's BOS index covers this much at once, the rest in the background
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # defaults do not depend on the cwd
FETCH_HINT = ("fetch FineWeb with `python data/cached_fineweb10B.py 9`, or make synthetic shards with "
              "`python data/synthetic.py` and pass --train_files / --val_files")


class UsageError(Exception):
    """A problem with how the script was launched; the message says what to do."""


class DataError(Exception):
    """A problem with the token data that the user must fix; the message says what to do."""


class TrainingError(Exception):
    """Training went wrong (a non-finite loss); the message says where."""


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


def check_shard(path):
    problem = shard_problem(path)
    if problem is None:
        return
    if problem.startswith("is not a file"):
        fix = "Give --train_files / --val_files patterns that match shard files only."
    elif problem.startswith("cannot be read"):
        fix = "Check that it exists and that you may read it."
    else:
        fix = "Delete it and fetch or generate it again."
    raise DataError(f"{path} {problem}. {fix}")


def is_synthetic(path):
    """Whether data/synthetic.py made this (well-formed) shard."""
    return int(np.fromfile(path, dtype="<i4", count=SYNTHETIC_WORD + 1)[SYNTHETIC_WORD]) == SYNTHETIC_MARK


def load_shard(path):
    """All tokens of a shard as a uint16 array (host memory: micro-batches are gathered from it)."""
    check_shard(path)
    tokens = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)
    if tokens.size and tokens.max() >= GPT2_VOCAB_SIZE:  # out-of-vocabulary ids would index past the logits
        position = int(np.argmax(tokens >= GPT2_VOCAB_SIZE))
        raise DataError(f"{path} holds token id {tokens[position]} at position {position}: ids must be below "
                        f"{GPT2_VOCAB_SIZE} (GPT-2's vocabulary). It is not a GPT-2 shard: fetch or generate it again.")
    return tokens


def shard_files(pattern):
    """The files of a glob pattern, sorted; "~" is the home folder, and a folder whose name holds glob
    characters ("run[1]/") is taken as named if the pattern finds nothing through it."""
    pattern = os.path.expanduser(pattern)
    folder, name = os.path.split(pattern)
    files = sorted(glob.glob(pattern)) or sorted(glob.glob(os.path.join(glob.escape(folder), name)))
    if files:
        return files
    if folder and not glob.glob(folder) and not os.path.isdir(folder):
        where = "" if os.path.isabs(folder) else f", in the current folder {os.getcwd()}, where relative patterns start"
        raise DataError(f"No such folder: {folder}{where}")
    raise DataError(f"No files match {pattern!r}: {FETCH_HINT}.")


def max_num_docs(local_tokens):
    """Fixed length of cu_seqlens (static shapes for compile): L // 384 rounded up to a multiple of 128,
    128 for every stage. FineWeb's fullest micro-batches hold 56 / 90 / 121 documents at 16,384 /
    32,768 / 49,152 tokens; the attention kernels pay for every entry (256 at 49,152 cost 3 ms a
    step), and the pre-flight walks every batch, so data with more documents fails before the GPU."""
    return 128 * max(1, -(-(local_tokens // 384) // 128))


def check_doc_count(num_docs, local_tokens, path):
    if num_docs + 1 > max_num_docs(local_tokens):
        raise DataError(f"{path}: a micro-batch of {local_tokens} tokens holds {num_docs} documents, more than the "
                        f"{max_num_docs(local_tokens) - 1} its cu_seqlens holds. Use shards "
                        "with longer documents, or raise max_num_docs() in train_gpt.py.")


def bigram_hash(x, bigram_vocab_size=BIGRAM_VOCAB_SIZE):
    """h[0] = B - 1; h[i] = (36313 x[i] XOR 27191 p[i-1]) mod (B - 1) with p = x, p[0] = B - 1, int32
    wrap-around products and a floor modulo (B = bigram vocab). x: int32 numpy array."""
    prev = x[:-1].copy()
    if prev.size:
        prev[0] = bigram_vocab_size - 1
    h = np.empty_like(x)
    h[0] = bigram_vocab_size - 1
    mixed = np.bitwise_xor(x[1:] * np.int32(36313), prev * np.int32(27191))
    h[1:] = np.mod(mixed, bigram_vocab_size - 1)
    return h


class MicroBatch(NamedTuple):
    inputs: torch.Tensor  # int32 (L,)
    targets: torch.Tensor  # int64 (L,)
    cu_seqlens: torch.Tensor  # int32 (max_num_docs,): document starts, then L
    bigram_hash: torch.Tensor  # int32 (L,)
    bigram_rows: np.ndarray  # the same hashes on the host: the bigram_embed rows the step touches


def micro_batch(buf, doc_starts, device, path):
    """One rank's micro-step from L + 1 tokens buf (int32) whose documents start at doc_starts."""
    local_tokens = buf.size - 1
    check_doc_count(len(doc_starts), local_tokens, path)
    cu_seqlens = np.full(max_num_docs(local_tokens), local_tokens, dtype=np.int32)
    cu_seqlens[:len(doc_starts)] = doc_starts
    inputs, hashes = buf[:-1], bigram_hash(buf[:-1])
    host = (torch.from_numpy(inputs), torch.from_numpy(buf[1:].astype(np.int64)), torch.from_numpy(cu_seqlens),
            torch.from_numpy(hashes))
    if torch.device(device).type == "cuda":
        host = [t.pin_memory() for t in host]
    return MicroBatch(*(t.to(device, non_blocking=True) for t in host), hashes)


class OutOfTrainingData(DataError):
    pass


class ShardReader:
    """Walks the training shards in order, one step of BOS-aligned slots at a time; loads the next
    shard and BOS-indexes the current one in background threads."""

    def __init__(self, pattern, files=None):
        """files: the pattern's files, where they are already resolved (shard_files)."""
        self.pattern = pattern
        self.files = shard_files(pattern) if files is None else files
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.next_index, self.next_load = 0, None
        self.rewind()

    def rewind(self):
        """Back to the first document of the first shard, loaded again only if the reader has left it."""
        if self.next_index == 1:
            self.cursor = 0
            return
        if self.next_load is not None:
            self.next_load.cancel()
        self.next_index, self.next_load = 0, self.pool.submit(load_shard, self.files[0])
        self.advance()

    def advance(self):
        """Switch to the next shard (already loading) and start loading the one after it."""
        if self.next_load is None:
            raise OutOfTrainingData(f"Ran out of training data after {self.path}: the schedule needs more tokens "
                                    f"than {self.pattern!r} holds ({len(self.files)} shards). "
                                    f"Add shards: {FETCH_HINT}.")
        self.path = self.files[self.next_index]
        self.array = self.next_load.result()
        self.next_index += 1
        self.next_load = (self.pool.submit(load_shard, self.files[self.next_index])
                          if self.next_index < len(self.files) else None)
        self.cursor = 0  # the next document to draw
        self.bos = np.flatnonzero(self.array[:SYNC_BOS_INDEX_TOKENS] == BOS_ID)
        self.bos_complete = self.array.size <= SYNC_BOS_INDEX_TOKENS
        self.full_bos = None if self.bos_complete else self.pool.submit(np.flatnonzero, self.array == BOS_ID)
        if self.bos.size < 2 and not self.bos_complete:
            self.bos, self.bos_complete = self.full_bos.result(), True
        if self.bos.size < 2:
            raise DataError(f"{self.path} holds {self.bos.size} BOS tokens ({BOS_ID}), so no complete document: "
                            "every document must start with BOS. It is not a FineWeb-format shard: fetch or generate "
                            "it again.")

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def next_step(self, local_tokens, max_seq_len):
        """The 8 slots of the next step (see plan_step), from this shard or, when its documents run
        out, from the next: a step never spans two shards, the old shard's tail is dropped."""
        plan = plan_step(self, self.cursor, local_tokens, max_seq_len)
        while plan is None:
            self.advance()
            plan = plan_step(self, 0, local_tokens, max_seq_len)
        slots, self.cursor = plan
        return slots

    def document_end(self, doc):
        """End of document number doc of this shard (the next BOS), or None past the last full one."""
        if doc + 1 >= self.bos.size and not self.bos_complete:
            self.bos, self.bos_complete = self.full_bos.result(), True
        return self.bos[doc + 1] if doc + 1 < self.bos.size else None


def plan_step(shard, cursor, local_tokens, max_seq_len):
    """The 8 slots of one step, each a list of (start, end) token ranges, and the advanced cursor;
    None if the walk runs past the last complete document of the shard."""
    slots = []
    for _ in range(SLOTS_PER_STEP):
        segments, taken = [], 0
        while taken < local_tokens + 1:
            end = shard.document_end(cursor)
            if end is None:
                return None
            start = shard.bos[cursor]
            end = min(end, start + max_seq_len, start + local_tokens + 1 - taken)
            segments.append((start, end))
            taken += end - start
            cursor += 1
        slots.append(segments)
    return slots, cursor


def distributed_data_generator(pattern, batch_tokens, max_seq_len, grad_accum_steps, rank=0, world_size=1,
                               device="cuda", files=None):
    """Yields a MicroBatch for each micro-step of this rank (files: as ShardReader takes them).

    send((batch_tokens, max_seq_len, grad_accum_steps)) after the last micro-step of a step switches
    the next steps to a new stage and returns that step's first micro-batch.
    """
    shard = ShardReader(pattern, files)
    try:
        while True:
            if world_size * grad_accum_steps != SLOTS_PER_STEP or batch_tokens % SLOTS_PER_STEP:
                raise ValueError(f"world_size * grad_accum_steps must be {SLOTS_PER_STEP} and the batch a multiple "
                                 "of it")
            slots = shard.next_step(batch_tokens // SLOTS_PER_STEP, max_seq_len)
            for micro_step in range(grad_accum_steps):
                segments = slots[micro_step * world_size + rank]
                buf = np.concatenate([shard.array[a:b] for a, b in segments]).astype(np.int32)
                doc_starts = np.cumsum([0] + [b - a for a, b in segments[:-1]])
                new_stage = yield micro_batch(buf, doc_starts, device, shard.path)
                if new_stage is not None:
                    if micro_step != grad_accum_steps - 1:
                        raise ValueError("a new stage can only be sent after the last micro-step of a step")
                    batch_tokens, max_seq_len, grad_accum_steps = new_stage
    finally:
        shard.close()


def shard_tokens(path):
    """The token count of a well-formed shard, from its header."""
    check_shard(path)
    return int(np.fromfile(path, dtype="<i4", count=3)[2])


def files_holding(files, tokens):
    """The first of files (shards, in order) that together hold at least tokens, and the tokens they hold,
    counted from their headers."""
    chosen, total = [], 0
    for path in files:
        if total >= tokens:
            break
        chosen.append(path)
        total += shard_tokens(path)
    return chosen, total


def validation_files(pattern, val_tokens):
    """The first files of the pattern (sorted) that hold the val_tokens + 1 tokens validation reads."""
    files, total = files_holding(shard_files(pattern), val_tokens + 1)
    if total < val_tokens + 1:
        raise DataError(f"{pattern!r} holds {total:,} tokens, fewer than the {val_tokens:,} + 1 that validation "
                        f"reads: lower --val_tokens, or {FETCH_HINT}.")
    return files


def validation_batches(files, val_tokens, local_tokens, grad_accum_steps, rank=0, world_size=1, device="cuda"):
    """Yields MicroBatches of contiguous validation windows, not BOS-aligned, from files (validation_files;
    only the first ones that hold the val_tokens + 1 tokens are loaded): slot j of each val step takes
    local_tokens + 1 tokens at j * local_tokens; documents start at the BOS tokens of the inputs."""
    step_tokens = local_tokens * world_size * grad_accum_steps
    if val_tokens % step_tokens:
        raise ValueError(f"val_tokens ({val_tokens}) must be a multiple of the val step ({step_tokens} tokens)")
    files, _ = files_holding(files, val_tokens + 1)
    shards = [load_shard(f) for f in files]
    for path, shard in zip(files, shards):
        if not np.any(shard == BOS_ID):
            raise DataError(f"{path} holds no BOS token ({BOS_ID}), so no document: it is not a FineWeb-format shard. "
                            "Fetch or generate it again.")
    tokens, file_ends = np.concatenate(shards), np.cumsum([len(shard) for shard in shards])
    for step_start in range(0, val_tokens, step_tokens):
        for micro_step in range(grad_accum_steps):
            start = step_start + (micro_step * world_size + rank) * local_tokens
            buf = tokens[start:start + local_tokens + 1].astype(np.int32)
            doc_starts = np.union1d([0], np.flatnonzero(buf[:-1] == BOS_ID))
            yield micro_batch(buf, doc_starts, device, files[np.searchsorted(file_ends, start, side="right")])

# ----------------------------------------------------------------------------------------------
# Kernels: the model's (Polar Express's symmetric products are with the optimizer)
#
# Every Triton kernel takes its dtypes from the tensors it is given, so the CPU tests can drive it
# with fp32 tensors under the Triton interpreter (which has no bf16); quack's GEMMs (on Hopper, the
# linear+ReLU^2 products and the attention's projections) are tested on the GPU. Scalar float
# arguments are cast to fp32 inside the kernels: under torch.compile they arrive as fp64.

# Tiled transpose copy / add: each program moves one tile, read coalesced along src rows and
# written coalesced along dst rows. PyTorch's element-wise transposed copy writes uncoalesced
# and occupies every SM, which starves the optimizer's NCCL traffic of overlap.


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, M, N, stride_sm, stride_sn, stride_dn, stride_dm,
                      ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # offsets pass 2^31 elements
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tile = tl.trans(tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=mask))
    dst = dst_ptr + cols[:, None] * stride_dn + rows[None, :] * stride_dm
    if ACCUMULATE:
        tile = tile.to(tl.float32) + tl.load(dst, mask=tl.trans(mask)).to(tl.float32)
    tl.store(dst, tile.to(dst_ptr.dtype.element_ty), mask=tl.trans(mask))


def _launch_transpose(src, dst, accumulate, block_m=64, block_n=64, num_warps=4):
    m, n = src.shape
    assert dst.shape == (n, m), f"transpose of {tuple(src.shape)} does not fit into {tuple(dst.shape)}"
    _transpose_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        src, dst, m, n, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
        ACCUMULATE=accumulate, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dst


def transpose_copy(src, dst, **config):
    """dst (N, M) = src^T for src (M, N): the tiled kernel on CUDA, plain PyTorch elsewhere."""
    return _launch_transpose(src, dst, False, **config) if src.is_cuda else dst.copy_(src.mT)


def transpose_add(src, dst, **config):
    """dst (N, M) += src^T for src (M, N), likewise."""
    return _launch_transpose(src, dst, True, **config) if src.is_cuda else dst.add_(src.mT)


FP8_TRANSPOSE_TILE = dict(block_m=64, block_n=128, num_warps=8)  # 128-byte rows read: 1.28 vs 1.65 ms at 64 x 64


def transposed(src, **config):
    """A contiguous copy of src^T, by default in FP8_TRANSPOSE_TILE tiles: this serves the FP8 loss,
    whose largest operand is the e5m2 logit gradient (49,152 x 50,304 per stage-3 micro-batch)."""
    return transpose_copy(src, src.new_empty(src.size(1), src.size(0)), **(FP8_TRANSPOSE_TILE | config))


# Fused linear + ReLU^2 (MLP up-projection), a persistent matmul with a fused epilogue; operands
# move through TMA tensor descriptors (Hopper's bulk copy engine), faster than pointer loads (docs/performance.md).
# Forward:  acc = x @ W^T;  post = relu(acc)^2 (from the rounded acc). Only post is stored.
# Backward: acc = g @ W_proj^T (same shape);  dpre = acc * 2 * sqrt(post) (from the rounded acc),
# which is 2 relu(pre) up to post's rounding: one (tokens x 3072) store less in the forward.


@triton.jit
def _relu_square_epilogue(acc, post_desc, out_desc, m0, n0, BACKWARD: tl.constexpr):
    """In two column halves: half the shared memory for the TMA stores. The backward loads both post
    halves before its arithmetic, 5% faster than a load and a store per half (docs/performance.md)."""
    half: tl.constexpr = acc.shape[1] // 2
    left, right = tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, half)), (0, 2, 1)))
    left, right = left.to(out_desc.dtype).to(tl.float32), right.to(out_desc.dtype).to(tl.float32)
    if BACKWARD:
        post_left, post_right = post_desc.load([m0, n0]).to(tl.float32), post_desc.load([m0, n0 + half]).to(tl.float32)
        left, right = left * 2.0 * tl.sqrt(post_left), right * 2.0 * tl.sqrt(post_right)
    else:
        left, right = tl.maximum(left, 0.0), tl.maximum(right, 0.0)
        left, right = left * left, right * right
    out_desc.store([m0, n0], left.to(out_desc.dtype))
    out_desc.store([m0, n0 + half], right.to(out_desc.dtype))


@triton.jit
def _tile_origin(tile, num_blocks_m, num_blocks_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """Grouped order: consecutive tiles share rows of x, keeping them in L2."""
    blocks_per_group = GROUP_M * num_blocks_n
    first_m = (tile // blocks_per_group) * GROUP_M
    group_size = min(num_blocks_m - first_m, GROUP_M)
    block_m = first_m + (tile % blocks_per_group) % group_size
    return block_m * BLOCK_M, ((tile % blocks_per_group) // group_size) * BLOCK_N


@triton.jit
def _linear_relu_square_kernel(
    x_desc, w_desc, post_desc, out_desc, M, N, K,
    BACKWARD: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_blocks_m = tl.cdiv(M, BLOCK_M)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    # flatten: one software pipeline over tiles and K steps, so the next tile's loads start during
    # this tile's epilogue (K = 768 is only 12 steps of 64)
    for tile in tl.range(tl.program_id(0), num_blocks_m * num_blocks_n, NUM_PROGRAMS, flatten=True):
        m0, n0 = _tile_origin(tile, num_blocks_m, num_blocks_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(tl.cdiv(K, BLOCK_K)):  # TMA loads zero-fill past the edges
            acc = tl.dot(x_desc.load([m0, k * BLOCK_K]), w_desc.load([n0, k * BLOCK_K]).T, acc)
        _relu_square_epilogue(acc, post_desc, out_desc, m0, n0, BACKWARD)


def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _launch_linear_relu_square(x, w, post, out, backward, block_m=128, block_n=256, block_k=64,
                               num_warps=8, num_stages=3, persistent=True):
    x, w = x.contiguous(), w.contiguous()  # TMA needs unit inner strides (a .sum() gradient has stride 0)
    m, k = x.shape
    n = w.size(0)
    num_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    num_programs = min(num_tiles, _num_sms(x.device)) if persistent else num_tiles
    epilogue_block = [block_m, block_n // 2]
    _linear_relu_square_kernel[(num_programs,)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]), TensorDescriptor.from_tensor(w, [block_n, block_k]),
        TensorDescriptor.from_tensor(post, epilogue_block), TensorDescriptor.from_tensor(out, epilogue_block),
        m, n, k, BACKWARD=backward, NUM_PROGRAMS=num_programs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def triton_linear_relu_square(x, w, **config):
    """post = relu(x @ w^T)^2 for x (M, K), w (N, K), by the Triton kernel."""
    post = x.new_empty(x.size(0), w.size(0))
    return _launch_linear_relu_square(x, w, post, post, False, **config)


# On Hopper, where quack is installed (a CuTe DSL GEMM library that FlashAttention 4 installs with
# it), the same products by quack's pingpong GEMM with the epilogues below: two warpgroups take
# turns, one's epilogue running during the other's products, and the blocks of a cluster share tile
# loads (TMA multicast), which Triton 3.6 cannot do. On one H100, forward 328-333 against the Triton
# kernel's 352-385 us, backward 396-414 against 423-447 for the Gluon kernel it replaced
# (docs/performance.md). The epilogues take the fp32 product: one rounding fewer than the Triton kernel's.
# The attention's projections take its plain product (`matmul`): 6-11% under cuBLAS's time at their
# shapes, 568.3 -> 563.4 ms a stage-3 step side by side on one H100.
QUACK_TILING = dict(tile_M=128, tile_N=192, cluster_M=2, cluster_N=1, pingpong=True, max_swizzle_size=16)


@functools.cache
def quack_epilogues():
    """quack's GEMM epilogues by name on a Hopper GPU, or None: another GPU, or no quack."""
    if torch.cuda.get_device_capability()[0] != 9:
        return None
    try:
        import cutlass.cute as cute
        from quack.epilogue.frontend import gemm_epilogue  # quack 0.6 or newer
    except ImportError:
        return None

    def linear(acc):  # kernel names carry these names: profile_gpt.py counts them
        return {"D": acc}

    def linear_relu_square_forward(acc):
        relu = cute.arch.fmax(acc, 0.0)
        return {"D": relu * relu}

    def linear_relu_square_backward(acc, post):
        return {"D": acc * 2.0 * cute.math.sqrt(post, fastmath=True)}
    epilogues = (linear, linear_relu_square_forward, linear_relu_square_backward)
    return {fn.__name__: gemm_epilogue()(fn) for fn in epilogues}


def quack_matmul(epilogue, a, b, out, tiling=None, **operands):
    """out = epilogue(a @ b) by quack, for b (K, N); a transposed weight, b = w^T, is read as w is stored."""
    b_kn = not b.mT.is_contiguous()
    b = b.contiguous() if b_kn else b.mT
    quack_epilogues()[epilogue].gemm(a.contiguous(), b, out, None, epi_args=operands, b_kn=b_kn,
                                     **(QUACK_TILING | (tiling or {})))
    return out


def quack_linear_relu_square(a, b, out, post=None, **tiling):
    """out = relu(a @ b^T)^2, or with post given (a backward) (a @ b^T) * 2 sqrt(post), by quack."""
    if post is None:
        return quack_matmul("linear_relu_square_forward", a, b.mT, out, tiling)
    return quack_matmul("linear_relu_square_backward", a, b.mT, out, tiling, post=post.contiguous())


# Custom ops: torch.compile keeps each launch whole (Dynamo does not trace CuTe DSL).
@torch.library.custom_op("speedrun::matmul", mutates_args=())
def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a (M, K), b (K, N): quack's GEMM on Hopper where installed, else cuBLAS."""
    if a.is_cuda and quack_epilogues():
        return quack_matmul("linear", a, b, a.new_empty(a.size(0), b.size(1)))
    return a @ b


@matmul.register_fake
def _(a, b):
    return a.new_empty(a.size(0), b.size(1))


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors  # b's gradient (K = tokens) by cuBLAS: quack's, split-K or not, was slower
    return matmul(grad, b.mT), a.mT @ grad


matmul.register_autograd(_matmul_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


@torch.library.custom_op("speedrun::linear_relu_square", mutates_args=())
def linear_relu_square(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """post = relu(x @ w^T)^2 for x (M, K), w (N, K): quack's GEMM on Hopper where installed, else Triton."""
    if x.is_cuda and quack_epilogues():
        return quack_linear_relu_square(x, w, x.new_empty(x.size(0), w.size(0)))
    return triton_linear_relu_square(x, w)


@linear_relu_square.register_fake
def _(x, w):
    return x.new_empty(x.size(0), w.size(0))


@torch.library.custom_op("speedrun::linear_relu_square_backward", mutates_args=())
def linear_relu_square_backward(grad: torch.Tensor, w_proj: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """dpre = (grad @ w_proj^T) * 2 * sqrt(post), which is 2 relu(pre), for grad (M, K), w_proj (N, K)
    and the forward's post (M, N): as linear_relu_square chooses."""
    if grad.is_cuda and quack_epilogues():
        return quack_linear_relu_square(grad, w_proj, torch.empty_like(post), post)
    return _launch_linear_relu_square(grad, w_proj, post, torch.empty_like(post), True)


@linear_relu_square_backward.register_fake
def _(grad, w_proj, post):
    return torch.empty_like(post)


class ReLUSquareMLP(torch.autograd.Function):
    """relu(x @ c_fc^T)^2 @ c_proj with c_fc, c_proj both (hidden, dim)."""

    @staticmethod
    def forward(ctx, x, c_fc, c_proj):
        post = linear_relu_square(x, c_fc)
        ctx.save_for_backward(x, c_fc, c_proj, post)
        return post @ c_proj

    @staticmethod
    def backward(ctx, grad):
        x, c_fc, c_proj, post = ctx.saved_tensors
        # cuBLAS first: it makes the CUDA context current in autograd's thread, which building
        # the host TMA descriptors needs (Triton's launcher would do it only after building them).
        grad_proj = post.mT @ grad
        dpre = linear_relu_square_backward(grad, c_proj, post)
        return dpre @ c_fc, dpre.mT @ x, grad_proj


# Queries, keys and values from the QKV projection's output (T, 3 * heads * head_dim), one pass
# each way: per-head RMS norm and rotary embedding of q and k, v copied beside them where a value
# embedding or head pairing changes it (elsewhere attention reads it in place). Inductor spent two
# or three kernels per layer on this, re-reading the projection (docs/performance.md).
# rotate: out = cos * y + sin * swap(y) with swap(y)[2i] = y[2i + 1], swap(y)[2i + 1] = -y[2i];
# its transpose: g -> cos * g - swap(sin * g). PAIRED: heads 2g and 2g + 1 read the two halves of a
# (T, 2 * head_dim) table. SHIFT_KEYS: the keys' second half comes from the previous token (row 0
# keeps its own), as long-window layers want. VALUE_EMBED: v += 2 sigmoid(logit) * value embedding,
# a logit per (token, head), in the same pass (Inductor's kernel for it read and wrote v once more).
# A program takes BLOCK rows of (token, head), all loads first: consecutive rows are neighbouring
# heads, so its reads are long runs of memory.

RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for bf16 and fp32 inputs


@triton.jit
def _swap_pairs(y):
    even, odd = tl.split(tl.reshape(y, (y.shape[0], y.shape[1] // 2, 2)))
    return tl.reshape(tl.join(odd, -even), y.shape)


@triton.jit
def _rms(x, EPS: tl.constexpr):
    return tl.rsqrt(tl.sum(x * x, axis=1) / x.shape[1] + EPS)[:, None]


@triton.jit
def _norm_rotate(x, cos, sin, EPS: tl.constexpr):
    """rotate(rms_norm(x)) in fp32, the norm rounded to x's dtype as F.rms_norm's output is."""
    y = (x.to(tl.float32) * _rms(x.to(tl.float32), EPS)).to(x.dtype).to(tl.float32)
    return y * cos.to(tl.float32) + _swap_pairs(y) * sin.to(tl.float32)


@triton.jit
def _norm_rotate_backward(grad, x, cos, sin, EPS: tl.constexpr):
    x = x.to(tl.float32)
    rstd = _rms(x, EPS)
    grad = grad * cos.to(tl.float32) - _swap_pairs(grad * sin.to(tl.float32))
    x_hat = x * rstd
    return (grad - x_hat * (tl.sum(x_hat * grad, axis=1)[:, None] / x.shape[1])) * rstd


@triton.jit
def _head_rows(T, table_stride, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRED: tl.constexpr,
               BLOCK: tl.constexpr):
    """This program's rows (token, head): their index, their offsets in a (T, heads, head_dim) tensor, their
    tokens, their offsets in qkv and in the rotary tables, and which are inside the T tokens."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    tokens, heads = rows // HEADS, rows % HEADS
    cols = tl.arange(0, HEAD_DIM)[None, :]
    qkv_offsets = (tokens * 3 * HEADS + heads)[:, None] * HEAD_DIM + cols
    table_offsets = tokens[:, None] * table_stride + cols + ((heads % 2)[:, None] * HEAD_DIM if PAIRED else 0)
    return (rows[:, None], rows[:, None] * HEAD_DIM + cols, tokens[:, None], qkv_offsets, table_offsets,
            (tokens < T)[:, None])


@triton.jit
def _qkv_heads_kernel(qkv_ptr, cos_ptr, sin_ptr, value_embed_ptr, value_logits_ptr, q_ptr, k_ptr, v_ptr, T,
                      table_stride, EPS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PAIRED: tl.constexpr, SHIFT_KEYS: tl.constexpr, VALUE_EMBED: tl.constexpr, BLOCK: tl.constexpr):
    row, out, tokens, src, table, mask = _head_rows(T, table_stride, HEADS, HEAD_DIM, PAIRED, BLOCK)
    width = HEADS * HEAD_DIM
    q, k = tl.load(qkv_ptr + src, mask=mask, other=0.0), tl.load(qkv_ptr + width + src, mask=mask, other=0.0)
    cos, sin = tl.load(cos_ptr + table, mask=mask, other=0.0), tl.load(sin_ptr + table, mask=mask, other=0.0)
    if SHIFT_KEYS:
        previous = tl.where(tokens > 0, 3 * width, 0)  # the offset back to the previous token's row
        k_prev = tl.load(qkv_ptr + width + src - previous, mask=mask, other=0.0)
        table_prev = table - tl.where(tokens > 0, table_stride, 0)
        cos_prev = tl.load(cos_ptr + table_prev, mask=mask, other=0.0)
        sin_prev = tl.load(sin_ptr + table_prev, mask=mask, other=0.0)
    if PAIRED or VALUE_EMBED:  # else v is read in place, from qkv
        v = tl.load(qkv_ptr + 2 * width + src, mask=mask)
        if VALUE_EMBED:
            gate = 2.0 * tl.sigmoid(tl.load(value_logits_ptr + row, mask=mask).to(tl.float32))
            v = v.to(tl.float32) + gate * tl.load(value_embed_ptr + out, mask=mask).to(tl.float32)
        tl.store(v_ptr + out, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(q_ptr + out, _norm_rotate(q, cos, sin, EPS).to(q_ptr.dtype.element_ty), mask=mask)
    k = _norm_rotate(k, cos, sin, EPS)
    if SHIFT_KEYS:
        second_half = tl.arange(0, HEAD_DIM)[None, :] >= HEAD_DIM // 2
        k = tl.where(second_half, _norm_rotate(k_prev, cos_prev, sin_prev, EPS), k)
    tl.store(k_ptr + out, k.to(k_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_heads_backward_kernel(dq_ptr, dk_ptr, dv_ptr, qkv_ptr, cos_ptr, sin_ptr, value_embed_ptr, value_logits_ptr,
                               dqkv_ptr, dvalue_embed_ptr, dvalue_logits_ptr, T, table_stride, EPS: tl.constexpr,
                               HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRED: tl.constexpr,
                               SHIFT_KEYS: tl.constexpr, VALUE_EMBED: tl.constexpr, BLOCK: tl.constexpr):
    row, grad, tokens, src, table, mask = _head_rows(T, table_stride, HEADS, HEAD_DIM, PAIRED, BLOCK)
    width = HEADS * HEAD_DIM
    dq = tl.load(dq_ptr + grad, mask=mask, other=0.0).to(tl.float32)
    dk = tl.load(dk_ptr + grad, mask=mask, other=0.0).to(tl.float32)
    dv = tl.load(dv_ptr + grad, mask=mask)
    q, k = tl.load(qkv_ptr + src, mask=mask, other=0.0), tl.load(qkv_ptr + width + src, mask=mask, other=0.0)
    cos, sin = tl.load(cos_ptr + table, mask=mask, other=0.0), tl.load(sin_ptr + table, mask=mask, other=0.0)
    if SHIFT_KEYS:  # token t's second half went to token t + 1, and token 0's to itself as well
        dk_next = tl.load(dk_ptr + grad + width, mask=tokens + 1 < T, other=0.0).to(tl.float32)
        second_half = tl.arange(0, HEAD_DIM)[None, :] >= HEAD_DIM // 2
        dk = tl.where(second_half, dk_next + tl.where(tokens == 0, dk, 0.0), dk)
    tl.store(dqkv_ptr + 2 * width + src, dv, mask=mask)
    if VALUE_EMBED:
        gate = tl.sigmoid(tl.load(value_logits_ptr + row, mask=mask, other=0.0).to(tl.float32))
        value_embed = tl.load(value_embed_ptr + grad, mask=mask, other=0.0).to(tl.float32)
        tl.store(dvalue_embed_ptr + grad, (2.0 * gate * dv.to(tl.float32)).to(dvalue_embed_ptr.dtype.element_ty),
                 mask=mask)
        dlogits = 2.0 * gate * (1.0 - gate) * tl.sum(dv.to(tl.float32) * value_embed, axis=1)[:, None]
        tl.store(dvalue_logits_ptr + row, dlogits.to(dvalue_logits_ptr.dtype.element_ty), mask=mask)
    tl.store(dqkv_ptr + src, _norm_rotate_backward(dq, q, cos, sin, EPS).to(dqkv_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dqkv_ptr + width + src,
             _norm_rotate_backward(dk, k, cos, sin, EPS).to(dqkv_ptr.dtype.element_ty), mask=mask)


def _launch_qkv_heads(kernel, tensors, T, table, heads, paired, shift_keys, value_embed, block=16, num_warps=2):
    kernel[(triton.cdiv(T * heads, block),)](
        *tensors, T, table.stride(0), EPS=RMS_EPS, HEADS=heads, HEAD_DIM=table.size(-1) // (1 + paired),
        PAIRED=paired, SHIFT_KEYS=shift_keys, VALUE_EMBED=value_embed, BLOCK=block, num_warps=num_warps)


def qkv_heads_forward(qkv, cos, sin, heads, paired, shift_keys, value_embed=None, value_logits=None, **config):
    """q, k, v (T, heads, head_dim) from qkv (T, 3 * heads * head_dim); cos, sin: rotary tables of at
    least T rows, (rows, 1, head_dim), or (rows, 1, 2 * head_dim) if paired; value_embed (T, heads *
    head_dim) and value_logits (T, heads), both or neither. v is a view of qkv unless a value
    embedding or head pairing changes it (the attention kernels read strided inputs)."""
    T, width = qkv.size(0), qkv.size(1) // 3
    q, k = (qkv.new_empty(T, heads, width // heads) for _ in range(2))
    v = qkv[:, 2 * width:].view(T, heads, -1) if not paired and value_embed is None else torch.empty_like(q)
    value = (qkv, qkv) if value_embed is None else (value_embed.contiguous(), value_logits.contiguous())  # qkv: unread
    _launch_qkv_heads(_qkv_heads_kernel, (qkv, cos, sin, *value, q, k, v), T, cos, heads, paired, shift_keys,
                      value_embed is not None, **config)
    return q, k, v


def qkv_heads_backward(dq, dk, dv, qkv, cos, sin, heads, paired, shift_keys, value_embed=None, value_logits=None,
                       **config):
    """The gradients of qkv_heads_forward's inputs qkv, value_embed and value_logits (None without them)."""
    dqkv = torch.empty_like(qkv)
    if value_embed is None:  # the kernel reads and writes none of these
        value, dvalue = (qkv, qkv), (dqkv, dqkv)
    else:
        value = value_embed.contiguous(), value_logits.contiguous()
        dvalue = tuple(map(torch.empty_like, value))
    _launch_qkv_heads(_qkv_heads_backward_kernel, (dq.contiguous(), dk.contiguous(), dv.contiguous(), qkv, cos, sin,
                                                   *value, dqkv, *dvalue), qkv.size(0), cos, heads, paired, shift_keys,
                      value_embed is not None, **config)
    return (dqkv, None, None) if value_embed is None else (dqkv, *dvalue)


class QKVHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, heads, paired, shift_keys, value_embed=None, value_logits=None):
        ctx.save_for_backward(qkv, cos, sin, value_embed, value_logits)
        ctx.config = heads, paired, shift_keys
        return qkv_heads_forward(qkv, cos, sin, heads, paired, shift_keys, value_embed, value_logits)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, cos, sin, value_embed, value_logits = ctx.saved_tensors
        dqkv, dvalue_embed, dvalue_logits = qkv_heads_backward(dq, dk, dv, qkv, cos, sin, *ctx.config, value_embed,
                                                               value_logits)
        return dqkv, None, None, None, None, None, dvalue_embed, dvalue_logits


# Softcapped multi-token cross-entropy. z = SOFTCAP * sigmoid((logit + SHIFT) / DIVISOR) lies in
# (0, SOFTCAP), so sum(exp(z)) over the vocabulary cannot overflow fp32 and needs no running max.
# Row r's loss is sum_k w_k * (logsumexp(z_r) - z_r[target[r + k]]) over k with r + k < rows.

SOFTCAP, SOFTCAP_SHIFT, SOFTCAP_DIVISOR = 23.0, 5.0, 7.5
# FP8 scales of the lm_head matmul (x / X_SCALE and W / W_SCALE are cast to e4m3) and of the
# e5m2 logit gradient (divided by GRAD_SCALE).
X_SCALE, W_SCALE, GRAD_SCALE = 100 / 448, 1.6 / 448, 0.75 / 448


# The training loss's kernel (evaluation's loss is plain PyTorch, eval_loss) is CUDA C++, compiled
# at the first call by NVRTC (PyTorch's CUDA builds ship it; no CUDA toolkit needed). A block per
# row copies the row's bf16 logits into shared memory (100 KB) as it sums their exponentials, then
# writes the e5m2 gradient from there: the logits are read from memory once, not twice as a Triton
# kernel must (Triton cannot place a row in shared memory, and one held in registers spills:
# docs/performance.md). Per element it computes what reference_mtp_losses does, with the sigmoid as
# 0.5 + 0.5 tanh.approx(u / 2) (within 4e-6 of the exact one over every bf16 logit, far below the
# logits' own rounding). Then the row's few target columns are rewritten with their one-hot terms.
# 512 threads and two blocks per SM: 3.13 ms against a Triton kernel's 4.16 at a stage-3 micro-batch
# on one H100 (docs/performance.md; kernels_test.py --bench --sweep times its launch settings).
# Upstream's record #79 (2026-04-04) first moved this kernel to NVRTC-compiled CUDA.
SOFTCAP_CE_SOURCE = r"""
#define VECTORS (VOCAB / 8)  // of 8 bf16, 16 bytes

__device__ __forceinline__ float bf16_low(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_high(unsigned int w) { return __uint_as_float(w & 0xFFFF0000u); }
__device__ __forceinline__ float tanh_approx(float x) {
    float y; asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}
// .ftz: plain ex2.approx wraps the MUFU instruction in a subnormal guard (FSETP and two FMULs), 13% of
// the kernel's SASS; without it 3,009-3,034 against 3,198 us a stage-3 micro-batch on one H100.
// The same bits: every argument lies in [-34, 23] (lse < 34: 50,304 terms of at most e^23).
__device__ __forceinline__ float exp_approx(float x) {
    float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f)); return y;
}
__device__ __forceinline__ float softcap_sigmoid(float logit) {
    return 0.5f + 0.5f * tanh_approx(0.5f * ((logit + SHIFT) * INV_DIVISOR));
}
__device__ __forceinline__ float sum_exp(unsigned int w) {
    return exp_approx(SOFTCAP * softcap_sigmoid(bf16_low(w))) + exp_approx(SOFTCAP * softcap_sigmoid(bf16_high(w)));
}
__device__ __forceinline__ float grad_of(float logit, float coef, float lse) {
    float sig = softcap_sigmoid(logit);
    return coef * exp_approx(SOFTCAP * sig - lse) * sig * (1.0f - sig);
}
// two floats as two e5m2 bytes (lo in the low byte), rounded to nearest, saturated to the largest finite
__device__ __forceinline__ unsigned int e5m2x2(float lo, float hi) {
    unsigned short d; asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ unsigned int grads4(unsigned int a, unsigned int b, float coef, float lse) {
    return e5m2x2(grad_of(bf16_low(a), coef, lse), grad_of(bf16_high(a), coef, lse))
        | (e5m2x2(grad_of(bf16_low(b), coef, lse), grad_of(bf16_high(b), coef, lse)) << 16);
}

extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM) softcap_ce_with_grad(
    const uint4* __restrict__ logits, const long long* __restrict__ targets, const float* __restrict__ weights,
    float* __restrict__ losses, uint2* __restrict__ grad, int n_rows, int n_predictions, double grad_multiplier)
{
    extern __shared__ uint4 row[];
    __shared__ float partial[THREADS / 32];
    const long long r = blockIdx.x;
    const uint4* src = logits + r * VECTORS;
    float sum = 0.0f;
    #pragma unroll UNROLL
    for (int v = threadIdx.x; v < VECTORS; v += THREADS) {
        uint4 x = src[v];
        row[v] = x;
        sum += sum_exp(x.x) + sum_exp(x.y) + sum_exp(x.z) + sum_exp(x.w);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.0f;
    for (int i = 0; i < THREADS / 32; i++) sum += partial[i];
    const float lse = __logf(sum);
    const unsigned short* row_bf16 = (const unsigned short*)row;
    float weight_sum = 0.0f;  // of the predictions whose target lies inside the batch
    for (int k = 0; k < n_predictions && r + k < n_rows; k++) weight_sum += weights[k];
    if (threadIdx.x == 0) {
        float loss = 0.0f;
        for (int k = 0; k < n_predictions && r + k < n_rows; k++)
            loss += weights[k] * (lse - SOFTCAP * softcap_sigmoid(bf16_low(row_bf16[targets[r + k]])));
        losses[r] = loss;
    }
    const float scale = (float)grad_multiplier * SOFTCAP_OVER_DIVISOR;
    uint2* dst = grad + r * VECTORS;
    #pragma unroll UNROLL
    for (int v = threadIdx.x; v < VECTORS; v += THREADS) {
        uint4 x = row[v];
        dst[v] = make_uint2(grads4(x.x, x.y, scale * weight_sum, lse), grads4(x.z, x.w, scale * weight_sum, lse));
    }
    __syncthreads();  // the rewrites below land after every store above
    if (threadIdx.x < n_predictions && r + threadIdx.x < n_rows) {
        long long target = targets[r + threadIdx.x];
        float sig = softcap_sigmoid(bf16_low(row_bf16[target])), onehot = 0.0f;
        for (int k = 0; k < n_predictions && r + k < n_rows; k++)
            onehot += targets[r + k] == target ? weights[k] : 0.0f;
        float g = scale * (weight_sum * exp_approx(SOFTCAP * sig - lse) - onehot) * sig * (1.0f - sig);
        ((unsigned char*)grad)[r * VOCAB + target] = e5m2x2(g, 0.0f) & 0xFF;
    }
}
"""
SOFTCAP_CE_THREADS, SOFTCAP_CE_UNROLL = 512, 4
SOFTCAP_CE_BLOCKS_PER_SM = 2  # each holds a row: 2 x 100 KB of the H100's 228 KB of shared memory
SOFTCAP_DEFINES = dict(SOFTCAP=f"{SOFTCAP!r}f", SHIFT=f"{SOFTCAP_SHIFT!r}f", INV_DIVISOR=f"{1 / SOFTCAP_DIVISOR!r}f",
                       SOFTCAP_OVER_DIVISOR=f"{SOFTCAP / SOFTCAP_DIVISOR!r}f")  # as fp32 literals


def compile_cuda_kernel(source, name, **defines):
    """The extern "C" kernel name of CUDA C++ source (no #include), compiled by NVRTC for the current
    GPU, the defines prepended as #define lines."""
    from torch.cuda._utils import _cuda_load_module, _get_gpu_rtc_library
    nvrtc = _get_gpu_rtc_library()
    source = "".join(f"#define {key} {value}\n" for key, value in defines.items()) + source
    program = ctypes.c_void_p()
    nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None)
    major, minor = torch.cuda.get_device_capability()
    options = (ctypes.c_char_p * 1)(f"--gpu-architecture=sm_{major}{minor}".encode())
    try:
        if nvrtc.nvrtcCompileProgram(program, len(options), options) != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC could not compile {name}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(program, cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return _cuda_load_module(cubin.raw, [name])[name]


@functools.cache
def softcap_ce_cuda_kernel(device_index, vocab, threads, unroll, blocks_per_sm):
    """softcap_ce_with_grad's kernel for one GPU and vocabulary size (a kernel is loaded per GPU)."""
    kernel = compile_cuda_kernel(SOFTCAP_CE_SOURCE, "softcap_ce_with_grad", VOCAB=vocab, THREADS=threads,
                                 UNROLL=unroll, BLOCKS_PER_SM=blocks_per_sm, **SOFTCAP_DEFINES)
    kernel.set_shared_memory_config(2 * vocab)
    return kernel


@torch.library.custom_op("speedrun::softcap_ce_with_grad", mutates_args=())
def softcap_ce_with_grad(logits: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor,
                         grad_multiplier: float, threads: int = SOFTCAP_CE_THREADS, unroll: int = SOFTCAP_CE_UNROLL,
                         blocks_per_sm: int = SOFTCAP_CE_BLOCKS_PER_SM) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row MTP losses (fp32) of the softcapped logits (CUDA, bf16, contiguous rows of a multiple of
    8 columns; targets int64), and the e5m2 gradient of their sum times grad_multiplier."""
    n_rows, n_cols = logits.shape
    if not (logits.dtype == torch.bfloat16 and logits.is_contiguous() and n_cols % 8 == 0
            and logits.data_ptr() % 16 == 0  # rows read 16 bytes at a time
            and targets.dtype == torch.int64 and targets.is_contiguous() and mtp_weights.dtype == torch.float32):
        raise ValueError("softcap_ce_with_grad takes contiguous, 16-byte aligned bf16 logits of a multiple of 8 "
                         "columns, int64 targets and float32 weights")
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    grad = torch.empty_like(logits, dtype=torch.float8_e5m2)
    kernel = softcap_ce_cuda_kernel(logits.device.index, n_cols, threads, unroll, blocks_per_sm)
    kernel(grid=(n_rows, 1, 1), block=(threads, 1, 1), shared_mem=2 * n_cols,
           args=[logits, targets, mtp_weights, losses, grad, n_rows, mtp_weights.numel(), float(grad_multiplier)])
    return losses, grad


@softcap_ce_with_grad.register_fake
def _(logits, targets, mtp_weights, grad_multiplier, threads=SOFTCAP_CE_THREADS, unroll=SOFTCAP_CE_UNROLL,
      blocks_per_sm=SOFTCAP_CE_BLOCKS_PER_SM):
    return logits.new_empty(logits.size(0), dtype=torch.float32), torch.empty_like(logits, dtype=torch.float8_e5m2)


class FP8SoftcapMTPLoss(torch.autograd.Function):
    """Sum over rows of the softcapped multi-token cross-entropy of logits = x @ w, w (dim, vocab).

    The logits come from an e4m3 scaled matmul. The forward also writes their gradient (of the
    unscaled sum, divided by GRAD_SCALE) as e5m2: one kernel reads the logits, which are then freed,
    and the backward is two FP8 matmuls whose scale takes the incoming gradient.
    """

    @staticmethod
    def forward(ctx, x, w, targets, mtp_weights):
        x_scale = torch.tensor(X_SCALE, dtype=torch.float32, device=x.device)
        w_scale = torch.tensor(W_SCALE, dtype=torch.float32, device=x.device)
        x_f8 = x.div(X_SCALE).to(torch.float8_e4m3fn)
        w_f8 = w.div(W_SCALE).to(torch.float8_e4m3fn)
        logits = torch._scaled_mm(x_f8, transposed(w_f8).mT, scale_a=x_scale, scale_b=w_scale,
                                  out_dtype=torch.bfloat16, use_fast_accum=True)
        losses, grad_f8 = softcap_ce_with_grad(logits, targets, mtp_weights, 1.0 / GRAD_SCALE)
        ctx.save_for_backward(x_f8, w_f8, x_scale, w_scale, grad_f8)
        ctx.w_dtype = w.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        x_f8, w_f8, x_scale, w_scale, grad_f8 = ctx.saved_tensors
        grad_scale = grad_loss.float() * GRAD_SCALE
        grad_x = torch._scaled_mm(grad_f8, w_f8.mT, scale_a=grad_scale, scale_b=w_scale,
                                  out_dtype=torch.bfloat16, use_fast_accum=False)
        grad_w = torch._scaled_mm(transposed(x_f8), transposed(grad_f8).mT, scale_a=x_scale,
                                  scale_b=grad_scale, out_dtype=ctx.w_dtype, use_fast_accum=False)
        return grad_x, grad_w, None, None


# Embedding gradients, only the rows a micro-batch touched. A dense backward zero-fills an fp32
# copy of each table, scatters into it, rounds it and adds it to .grad: several GB of traffic per
# micro-batch for the token, value and bigram tables (0.85 GB in bf16), of which a stage-3
# micro-batch touches at most 49,152 rows (-7.6 ms per stage-3 step, docs/performance.md).
# Here the tokens are sorted by row, so each row's tokens form a run; a program takes EMBED_CHUNK
# consecutive sorted tokens, sums every run inside them with one 0/1 matmul, and the program
# holding a run's first token writes it: the sum in fp32, rounded to the table's dtype, added to
# the gradient row (the rounding of the dense backward followed by .grad +=). No atomics: the
# result is deterministic. A run longer than the chunk (a frequent token) is finished by its
# first program, EMBED_TAIL tokens at a time.


@triton.jit
def _embedding_grad_kernel(grad_ptr, order_ptr, sorted_ptr, table_grad_ptr, T, D, grad_stride, table_stride,
                           CHUNK: tl.constexpr, TAIL: tl.constexpr, BLOCK_D: tl.constexpr):
    pos = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_cols = cols < D
    valid = pos < T
    rows = tl.load(sorted_ptr + pos, mask=valid, other=-1)
    first = valid & (rows != tl.load(sorted_ptr + pos - 1, mask=valid & (pos > 0), other=-1))
    tokens = tl.load(order_ptr + pos, mask=valid, other=0).to(tl.int64)
    grad = tl.load(grad_ptr + tokens[:, None] * grad_stride + cols[None, :],
                   mask=valid[:, None] & in_cols[None, :], other=0.0)
    same_run = (rows[:, None] == rows[None, :]) & valid[None, :]
    run_sums = tl.dot(same_run.to(grad.dtype), grad, input_precision="ieee")  # exact products, fp32 sums
    # the chunk's last run may go on: if it starts here, sum the rest of it
    last_row = tl.max(rows)
    rest = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = tl.program_id(0) * CHUNK + CHUNK
    more = (tl.sum((first & (rows == last_row)).to(tl.int32)) > 0) & (start < T)
    while more:
        tail = start + tl.arange(0, TAIL)
        in_range = tail < T
        in_run = tl.load(sorted_ptr + tail, mask=in_range, other=-1) == last_row
        tail_tokens = tl.load(order_ptr + tail, mask=in_range, other=0).to(tl.int64)  # not waiting for in_run
        tail_grad = tl.load(grad_ptr + tail_tokens[:, None] * grad_stride + cols[None, :],
                            mask=in_range[:, None] & in_cols[None, :], other=0.0)
        rest += tl.sum(tl.where(in_run[:, None], tail_grad.to(tl.float32), 0.0), axis=0)
        more = tl.sum(in_run.to(tl.int32)) == TAIL
        start += TAIL
    run_sums += tl.where((rows == last_row)[:, None], rest[None, :], 0.0)
    dst = table_grad_ptr + rows.to(tl.int64)[:, None] * table_stride + cols[None, :]
    write = first[:, None] & in_cols[None, :]
    rounded = run_sums.to(table_grad_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dst, (tl.load(dst, mask=write).to(tl.float32) + rounded).to(table_grad_ptr.dtype.element_ty),
             mask=write)


EMBED_CHUNK, EMBED_TAIL = 64, 128  # none of 27 launches timed on synthetic tokens was 1% faster (docs/performance.md)


def add_embedding_grad(grad, sorted_rows, order, table_grad, chunk=EMBED_CHUNK, tail=EMBED_TAIL, block_d=128,
                       num_warps=4):
    """table_grad[r] += (sum of grad[t] over the tokens t of row r), the sum rounded first, for grad
    (T, D), table_grad (rows, D) and (sorted_rows, order) = torch.sort(the rows of the T tokens)."""
    T, D = grad.shape
    assert table_grad.size(1) == D and grad.stride(1) == table_grad.stride(1) == 1
    _embedding_grad_kernel[(triton.cdiv(T, chunk), triton.cdiv(D, block_d))](
        grad, order, sorted_rows, table_grad, T, D, grad.stride(0), table_grad.stride(0), CHUNK=chunk, TAIL=tail,
        BLOCK_D=block_d, num_warps=num_warps)
    return table_grad


def gather_rows(indices, rows, params):
    """Every table of rows rows stacked in params, looked up at indices."""
    return tuple(F.embedding(indices, table) for param in params for table in param.split(rows))


class EmbeddingRows(torch.autograd.Function):
    """gather_rows whose backward adds into each parameter's .grad with add_embedding_grad and gives
    autograd nothing, where autograd would add a dense gradient. So it runs outside the compiled graph."""

    @staticmethod
    def forward(ctx, indices, rows, *params):
        ctx.save_for_backward(indices)
        ctx.params, ctx.rows = params, rows
        return gather_rows(indices, rows, params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        indices, = ctx.saved_tensors
        sorted_rows, order = torch.sort(indices)
        for param in ctx.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        table_grads = [table for param in ctx.params for table in param.grad.split(ctx.rows)]
        for grad, table_grad in zip(grads, table_grads):
            add_embedding_grad(grad, sorted_rows, order, table_grad)
        return (None, None) + (None,) * len(ctx.params)


def embedding_rows(indices, rows, *params):
    """Each table of rows rows stacked in params (a (k * rows, D) parameter holds k) looked up at
    indices (T,): a (T, D) tensor per table; on CUDA through EmbeddingRows."""
    return EmbeddingRows.apply(indices, rows, *params) if indices.is_cuda else gather_rows(indices, rows, params)


# ----------------------------------------------------------------------------------------------
# Model
#
# 11 layers. Layers 0-5 have one residual lane, layer 6 is MLP-only, layers 7-10 keep two lanes
# (attention writes to both, the MLP reads lane 1).


@dataclass(frozen=True)
class Layer:
    attention: bool = True  # False: the MLP only, after lane 0 takes back the skip
    paired_heads: bool = False  # attends over head pairs at doubled sequence positions
    long_window: bool = False  # the long window; half of each key comes from the previous token
    value_embed: int = None  # the value-embedding table (and gate) added to its values
    two_lanes: bool = False  # in the first such layer lane 1 starts as lane 0, and lane 0 after it is the backout
    saves_skip: bool = False  # lane 0 after its attention is saved as the skip (the MLP-only layer adds it back)


LAYERS = (
    Layer(paired_heads=True),
    Layer(value_embed=0),
    Layer(paired_heads=True, value_embed=1),
    Layer(long_window=True, saves_skip=True),
    Layer(),
    Layer(paired_heads=True),
    Layer(attention=False),
    Layer(two_lanes=True),
    Layer(two_lanes=True, value_embed=2),
    Layer(two_lanes=True, paired_heads=True, value_embed=3),
    Layer(two_lanes=True, long_window=True, value_embed=4),
)
NUM_LAYERS, NUM_ATTENTION_LAYERS = len(LAYERS), sum(layer.attention for layer in LAYERS)
NUM_VALUE_EMBEDS = sum(layer.value_embed is not None for layer in LAYERS)  # a table per layer that has one
GATE_DIM = 12
# scalars: an (attention in, attention out) lambda pair per layer, then these three
SMEAR_LAMBDA, BACKOUT_LAMBDA, SKIP_LAMBDA = 2 * NUM_LAYERS, 2 * NUM_LAYERS + 1, 2 * NUM_LAYERS + 2
NUM_SCALARS = SKIP_LAMBDA + 1
SCALARS_SIZE = NUM_SCALARS + (-NUM_SCALARS) % SLOTS_PER_STEP  # padded: every world size divides it
WINDOW_BLOCK = 128  # attention windows are counted in blocks of this many tokens (Stage.windows)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotate(x, cos, sin):
    """Rotate adjacent pairs: out[2i] = cos x[2i] + sin x[2i+1], out[2i+1] = cos x[2i+1] - sin x[2i]."""
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack((pairs[..., 1], -pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + swapped * sin


ROTARY_MIN_FREQUENCY = 1 / 1024  # per position; the fastest is 1, the others spaced geometrically
ATTN_SCALE = 0.1  # softmax scale of q k^T before YaRN (q and k are RMS-normed)
# YaRN: frequencies turning less than YARN_FULL times over the old window are stretched fully, more
# than YARN_NONE times not at all; the scale grows by YARN_SCALE_SLOPE * log(new / old window) + 1
YARN_FULL, YARN_NONE, YARN_SCALE_SLOPE = 1, 32, 0.2


class Rotary:
    """Half-truncated RoPE (head_dim / 4 frequencies, each on two dims; the other half of the dims
    is stationary) with YaRN stretching, over positions of the packed micro-batch.

    Two tables: plain (position t) and paired (position 2t in the first head_dim columns, 2t + 1
    in the rest, for a pair of heads rotated together)."""

    def __init__(self, head_dim, max_len, device):
        self.head_dim, self.max_len = head_dim, max_len
        self.base_freqs = ROTARY_MIN_FREQUENCY ** torch.linspace(0, 1, head_dim // 4, dtype=torch.float32,
                                                                 device=device)
        shape = (max_len, 1, head_dim)
        self.cos, self.sin = (torch.empty(shape, dtype=torch.bfloat16, device=device) for _ in range(2))
        self.paired_cos, self.paired_sin = (torch.empty((max_len, 1, 2 * head_dim), dtype=torch.bfloat16,
                                                        device=device) for _ in range(2))
        self.attn_scale = torch.empty((), dtype=torch.float64)  # on the CPU: the attention reads it at run time
        self.reset()

    def reset(self):
        self.freqs = torch.cat([self.base_freqs.repeat_interleave(2), self.base_freqs.new_zeros(self.head_dim // 2)])
        self.attn_scale.fill_(ATTN_SCALE)
        self._build()

    def _build(self):
        # tables are rewritten in place so that compiled graphs keep reading the same tensors
        angles = torch.arange(2 * self.max_len, dtype=torch.float32, device=self.freqs.device)[:, None] * self.freqs
        cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
        self.cos.copy_(cos[:self.max_len, None])
        self.sin.copy_(sin[:self.max_len, None])
        self.paired_cos.copy_(cos.view(self.max_len, 1, 2 * self.head_dim))
        self.paired_sin.copy_(sin.view(self.max_len, 1, 2 * self.head_dim))

    def yarn(self, old_window, new_window):
        """Stretch the slow frequencies for a long window growing from old_window to new_window tokens."""
        rotations = old_window * self.freqs / (2 * math.pi)
        scale = old_window / new_window
        ramp = ((rotations - YARN_FULL) / (YARN_NONE - YARN_FULL)).clamp(0, 1)
        self.freqs = self.freqs * (scale + ramp * (1 - scale))
        self.attn_scale.mul_(YARN_SCALE_SLOPE * math.log(new_window / old_window) + 1)  # in place, as the tables
        self._build()


def reference_qkv_heads(qkv, cos, sin, heads, paired, shift_keys, value_embed=None, value_logits=None):
    """q, k, v (T, heads, head_dim) from the QKV projection: q and k RMS-normed per head, then rotated;
    paired: heads 2g and 2g + 1 together at positions (2t, 2t + 1) of the paired tables; shift_keys:
    each key's stationary second half from the previous token; value_embed (T, heads * head_dim), if
    given, added to v per head scaled by 2 sigmoid(value_logits (T, heads)). Plain PyTorch (CPU and tests)."""
    T = qkv.size(0)
    q, k, v = qkv.view(T, 3, heads, -1).unbind(1)
    hd = q.size(-1)
    cos, sin = cos[:T], sin[:T]
    q, k = (rotate(norm(t).reshape(T, -1, cos.size(-1)), cos, sin).view(T, heads, hd) for t in (q, k))
    if shift_keys:
        k = torch.cat([k[:, :, :hd // 2], torch.cat([k[:1, :, hd // 2:], k[:-1, :, hd // 2:]])], dim=-1)
    if value_embed is not None:
        v = v + (2 * torch.sigmoid(value_logits))[..., None] * value_embed.view(T, heads, hd)
    return q, k, v


def qkv_heads(qkv, cos, sin, heads, paired, shift_keys, value_embed=None, value_logits=None):
    """reference_qkv_heads: one Triton kernel each way on CUDA (qkv contiguous)."""
    if qkv.is_cuda:
        return QKVHeads.apply(qkv, cos, sin, heads, paired, shift_keys, value_embed, value_logits)
    return reference_qkv_heads(qkv, cos, sin, heads, paired, shift_keys, value_embed, value_logits)


def attention_mask(T, cu_seqlens, window):
    """(T, T), true where the query at position i sees the key at j: j in i - window .. i, one document."""
    positions = torch.arange(T, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens, positions, right=True)
    offset = positions[:, None] - positions[None, :]
    return (doc[:, None] == doc[None, :]) & (offset >= 0) & (offset <= window)


def reference_attention(q, k, v, cu_seqlens, window, scale):
    """Causal attention within documents (attention_mask). q, k, v: (T, heads, head_dim); window and
    scale: numbers or 0-d tensors. Plain PyTorch with an explicit mask (CPU and tests)."""
    mask = attention_mask(q.size(0), cu_seqlens, window)
    out = F.scaled_dot_product_attention((q * scale).transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=1.0)
    return out.transpose(0, 1)


# Attention backends, fastest first. FlashAttention 4 (pip flash-attn-4, CuTe DSL kernels compiled
# at first use) makes a stage-3 step 7% faster than PyTorch's varlen flash attention on an H200
# (docs/performance.md). Both enter the compiled model through the two custom ops below, which
# torch.compile keeps whole. Their window and softmax scale are 0-d CPU tensors read when the op
# runs, not constants baked into the graph: one compiled graph then serves every stage's windows
# and every YaRN scale (4 graphs to compile instead of 9). FA4_VERSION is the release measured.
FA4_VERSION = "4.0.0b36"
ATTENTION_BACKENDS = ("auto", "fa4", "torch")
ATTENTION_INSTALL = {
    "fa4": f"FlashAttention 4 on an sm90 (Hopper) or sm100 (Blackwell) GPU: pip install flash-attn-4=={FA4_VERSION}",
    "torch": "a CUDA GPU",  # and torch >= OLDEST_TORCH, which main checks first
}


def choose_attention_backend(requested, capability, fa4_importable):
    """The backend to run: 'reference' without a GPU (capability None), else the requested one, or
    for 'auto' the fastest usable."""
    usable = [name for name, ok in (("fa4", fa4_importable and capability and capability[0] in (9, 10)),
                                    ("torch", capability is not None)) if ok]
    if requested == "auto":
        return usable[0] if usable else "reference"
    if requested not in usable:
        gpu = f"sm{capability[0]}{capability[1]}" if capability else "no CUDA GPU"
        raise UsageError(f"--attention {requested} is not available here ({gpu}): it needs "
                         f"{ATTENTION_INSTALL[requested]}; or use --attention auto")
    return requested


def fa4_importable():
    try:
        import flash_attn.cute.interface  # noqa: F401  (CuTe DSL: a few seconds to import)
    except ImportError:
        return False
    return True


def check_fa4_installed(requested):
    """--attention fa4 where FlashAttention 4 cannot be imported: known before any GPU work."""
    try:
        missing = requested == "fa4" and not fa4_importable()
    except Exception:  # installed, but its import needs something only the GPU run will show
        return
    if missing:
        raise UsageError(f"--attention fa4 needs {ATTENTION_INSTALL['fa4']}, and it does not import here: install "
                         "it, or use --attention auto")


def attention_backend(requested, device):
    """choose_attention_backend for this machine: the GPU of device, and whether FA4 imports."""
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    importable = capability is not None and requested in ("auto", "fa4") and fa4_importable()
    return choose_attention_backend(requested, capability, importable)


def package_versions(*packages):
    """The "name version" of each of these pip packages that is installed, for the log."""
    from importlib.metadata import PackageNotFoundError, version
    versions = []
    for package in packages:
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return versions


def describe_attention_backend(backend):
    """The backend with the versions of the libraries behind it, for the log."""
    versions = package_versions(*{"fa4": ("flash-attn-4", "nvidia-cutlass-dsl"), "torch": ("torch",)}.get(backend, ()))
    return f"{backend} ({', '.join(versions)})" if versions else backend


def describe_gemm_kernels():
    """Which kernels run the linear+ReLU² products and the attention's projections, for the log: a run
    without quack is slower."""
    if quack_epilogues():
        return f"quack ({', '.join(package_versions('quack-kernels'))})"
    if torch.cuda.get_device_capability()[0] != 9:
        return "Triton and cuBLAS (quack's GEMMs run on Hopper only)"
    return "Triton and cuBLAS (quack-kernels 0.6 or newer does not import: pip install it for faster products)"


@torch.library.custom_op("speedrun::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int,
                      window: torch.Tensor, scale: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal varlen attention, keys i - window .. i: the output (T, heads, head_dim) and its
    log-sum-exp (heads, T)."""
    window, scale = int(window), float(scale)
    if backend == "fa4":
        from flash_attn.cute.interface import _flash_attn_fwd
        out, lse, *_ = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                       max_seqlen_q=max_seq_len, max_seqlen_k=max_seq_len, softmax_scale=scale,
                                       causal=True, window_size_left=window, window_size_right=0, return_lse=True)
    else:
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seq_len, max_seq_len, 0.0, True, False, scale=scale,
            window_size_left=window, window_size_right=0)
    return out.contiguous(), lse


@attention_forward.register_fake
def _(q, k, v, cu_seqlens, max_seq_len, window, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op("speedrun::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int, window: torch.Tensor,
                       scale: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of attention_forward (contiguous, as the fake below promises)."""
    window, scale = int(window), float(scale)
    if backend == "fa4":
        from flash_attn.cute.interface import _flash_attn_bwd
        grads = _flash_attn_bwd(q, k, v, out, grad_out, lse, softmax_scale=scale, causal=True,
                                window_size_left=window, window_size_right=0, cu_seqlens_q=cu_seqlens,
                                cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seq_len, max_seqlen_k=max_seq_len)
    else:
        no_dropout = torch.empty(0, device=q.device)  # the philox seed and offset are unused without dropout
        grads = torch.ops.aten._flash_attention_backward(
            grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seq_len, max_seq_len, 0.0, True, no_dropout,
            no_dropout, scale=scale, window_size_left=window, window_size_right=0)
    return tuple(g.contiguous() for g in grads[:3])


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seq_len, window, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class GatedAttention(torch.autograd.Function):
    """attention_forward's output times a gate per (token, head), gate (T, heads) in (0, 1). The
    backward passes the attention kernel the gated output's gradient g, and lse - log(gate) for lse:
    its probabilities become gate * P, so its dv = P^T (gate g) and its dS = P * ((gate g) v^T -
    rowsum(out * gate g)), the gradients for out's gradient gate * g, which is never written (75 MB a
    stage-3 layer; docs/performance.md)."""

    @staticmethod
    def forward(ctx, q, k, v, gate, cu_seqlens, max_seq_len, window, scale, backend):
        out, lse = attention_forward(q, k, v, cu_seqlens, max_seq_len, window, scale, backend)
        ctx.save_for_backward(q, k, v, gate, out, lse, cu_seqlens, window, scale)
        ctx.max_seq_len, ctx.backend = max_seq_len, backend
        return out * gate[..., None]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, gate, out, lse, cu_seqlens, window, scale = ctx.saved_tensors
        grad_gate = (grad.float() * out.float()).sum(-1).to(gate.dtype)
        gated_lse = (lse - torch.log(gate.float()).mT).contiguous()
        dq, dk, dv = attention_backward(grad, q, k, v, out, gated_lse, cu_seqlens, ctx.max_seq_len, window, scale,
                                        ctx.backend)
        return dq, dk, dv, grad_gate, None, None, None, None, None


def attention(q, k, v, gate, cu_seqlens, max_seq_len, window, scale, backend):
    """reference_attention's semantics through the given backend (attention_backend chooses it), each
    (token, head)'s output times gate (T, heads). window (int32) and scale (float64): 0-d CPU tensors."""
    if backend == "reference":
        return reference_attention(q, k, v, cu_seqlens, window, scale) * gate[..., None]
    return GatedAttention.apply(q, k, v, gate, cu_seqlens, max_seq_len, window, scale, backend)


def window_tensor(windows):
    """The model's windows argument: (short, long) in WINDOW_BLOCKs as an int32 CPU tensor of tokens."""
    return torch.tensor([WINDOW_BLOCK * w for w in windows], dtype=torch.int32)


def mlp(x, c_fc, c_proj):
    """relu(x @ c_fc^T)^2 @ c_proj: the fused kernel on CUDA, plain PyTorch elsewhere."""
    if x.is_cuda:
        return ReLUSquareMLP.apply(x, c_fc, c_proj)
    return F.relu(x @ c_fc.mT).square() @ c_proj


def softcap(logits):
    """SOFTCAP * sigmoid((logits + SHIFT) / DIVISOR) in fp32, or in fp64 for fp64 logits (the tests')."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return SOFTCAP * torch.sigmoid((logits + SOFTCAP_SHIFT) / SOFTCAP_DIVISOR)


def reference_mtp_losses(logits, targets, mtp_weights):
    """Per-row softcapped multi-token losses in fp32 (fp64 for fp64 logits):
    sum_k w_k (lse(z_r) - z_r[target[r + k]])."""
    z = softcap(logits)
    lse = torch.logsumexp(z, dim=-1)
    losses = torch.zeros_like(lse)
    for k, w in enumerate(mtp_weights.unbind(0)):
        rows = z.size(0) - k
        picked = z[:rows].gather(1, targets[k:, None]).squeeze(1)
        losses = losses + F.pad(w * (lse[:rows] - picked), (0, k))
    return losses


def training_loss(x, lm_head, targets, mtp_weights):
    """Sum over rows of the multi-token loss: FP8 logits and kernels on CUDA, fp32 reference elsewhere."""
    if x.is_cuda:
        return FP8SoftcapMTPLoss.apply(x, lm_head, targets, mtp_weights)
    return reference_mtp_losses(x @ lm_head, targets, mtp_weights).sum()


def eval_loss(x, lm_head, targets, chunk_rows=32768):
    """Mean softcapped cross-entropy of bf16 logits in exact fp32 math (the reported loss: no approximate
    sigmoid; Inductor fuses it into a few passes over each chunk), in row chunks to bound memory."""
    one = torch.ones(1, device=x.device)
    return torch.cat([reference_mtp_losses(x[rows:rows + chunk_rows] @ lm_head, targets[rows:rows + chunk_rows], one)
                      for rows in range(0, x.size(0), chunk_rows)]).mean()


class GPT(nn.Module):
    def __init__(self, vocab_size=VOCAB_SIZE, num_heads=6, head_dim=128, model_dim=768, max_len=262144,
                 dtype=torch.bfloat16, device=None, attention="auto"):
        super().__init__()
        self.attention_backend = attention_backend(attention, device or "cpu")
        d, hidden = model_dim, 4 * model_dim
        self.num_heads, self.head_dim, self.vocab_size = num_heads, head_dim, vocab_size
        self.bigram_vocab_size = BIGRAM_ROWS_PER_TOKEN * vocab_size
        bound = math.sqrt(3) * 0.5 * d ** -0.5
        kw = dict(dtype=dtype, device=device)

        self.lm_head = nn.Parameter(torch.empty(d, vocab_size, **kw).normal_(0, 0.005))  # stored (in, out)
        self.embed = nn.Parameter(self.lm_head.detach().T.contiguous())  # tied to lm_head until the split step
        self.value_embeds = nn.Parameter(0.01 * torch.randn(NUM_VALUE_EMBEDS * vocab_size, d, **kw))
        self.bigram_embed = nn.Parameter(torch.zeros(self.bigram_vocab_size, d, **kw))
        # attention bank: per layer with attention, rows [Q; K; V; O] of (d, d) each
        self.attn_bank = nn.Parameter(torch.empty(NUM_ATTENTION_LAYERS, 4 * d, d, **kw).uniform_(-bound, bound))
        # MLP bank: [layer, c_fc / c_proj]; layer 11 pads 24 matrices to split over 8 ranks
        mlp_bank = torch.zeros(NUM_LAYERS + 1, 2, hidden, d, **kw)
        mlp_bank[:, 0].uniform_(-bound, bound)
        self.mlp_bank = nn.Parameter(mlp_bank)
        self.attn_gate_bank = nn.Parameter(torch.zeros(NUM_ATTENTION_LAYERS, num_heads, GATE_DIM, **kw))
        self.ve_gate_bank = nn.Parameter(torch.zeros(NUM_VALUE_EMBEDS, num_heads, GATE_DIM, **kw))
        self.smear_gate = nn.Parameter(torch.zeros(1, GATE_DIM, **kw))
        self.skip_gate = nn.Parameter(torch.zeros(1, GATE_DIM, **kw))
        f32 = dict(dtype=torch.float32, device=device)
        post = torch.ones(NUM_LAYERS, 2, 2, **f32)  # [layer, attention / MLP, lane 0 / lane 1]
        post[[layer.two_lanes for layer in LAYERS], 0, 1] = 1.5
        self.post_lambdas = nn.Parameter(post)
        self.x0_lambdas = nn.Parameter(torch.zeros(NUM_LAYERS, **f32))
        self.bigram_lambdas = nn.Parameter(torch.full((NUM_LAYERS,), 0.05, **f32))
        self.resid_lambdas = nn.Parameter(torch.full((NUM_LAYERS, 2), math.sqrt(1.1), **f32))  # [:, attention / MLP]
        scalars = torch.ones(SCALARS_SIZE, **f32)
        scalars[:2 * NUM_LAYERS:2] = 0.5
        scalars[SMEAR_LAMBDA], scalars[BACKOUT_LAMBDA], scalars[SKIP_LAMBDA] = 0.0, 0.5, -1.5
        self.scalars = nn.Parameter(scalars)
        self.rotary = Rotary(head_dim, max_len, device)

    def attn(self, x, layer, weights, gate, scales, cu_seqlens, max_seq_len, window, value=None):
        """Attention of one layer: weights, its [Q; K; V; O] rows; gate, its output gate; scales, the
        (input, output) lambdas; value, (value embedding, its gate) if the layer has one."""
        T, h, hd = x.size(0), self.num_heads, self.head_dim
        paired = layer.paired_heads
        tables = (self.rotary.paired_cos, self.rotary.paired_sin) if paired else (self.rotary.cos, self.rotary.sin)
        value_embed = value_logits = None
        if value is not None:  # added to v inside qkv_heads
            value_embed, value_gate = value
            gate_in = x[:, :GATE_DIM] if paired else torch.cat([x[:, :GATE_DIM // 2], value_embed[:, :GATE_DIM // 2]],
                                                               dim=-1)
            value_logits = gate_in @ value_gate.mT
        qkv = matmul(x, (scales[0] * weights[:3 * h * hd]).mT)
        q, k, v = qkv_heads(qkv, *tables, h, paired, layer.long_window, value_embed, value_logits)
        output_gate = torch.sigmoid(x[:, :GATE_DIM] @ gate.mT)
        if paired:  # token t's heads (0, 1, 2) become position 2t and heads (3, 4, 5) position 2t + 1
            q, k, v = (t.reshape(2 * T, h // 2, hd) for t in (q, k, v))
            y = attention(q, k, v, output_gate.reshape(2 * T, h // 2), 2 * cu_seqlens, 2 * max_seq_len, window,
                          self.rotary.attn_scale, self.attention_backend)
        else:
            y = attention(q, k, v, output_gate, cu_seqlens, max_seq_len, window, self.rotary.attn_scale,
                          self.attention_backend)
        return matmul(y.reshape(T, h * hd), (scales[1] * weights[3 * h * hd:]).mT)

    def forward(self, inputs, targets, cu_seqlens, bigram_hash, max_seq_len, windows, mtp_weights=None, trunk=None):
        """Training (mtp_weights given): the summed multi-token loss. Eval: the mean loss.
        windows: window_tensor((short, long)), attention windows in tokens, read at run time.
        trunk: self.trunk compiled (build_model's). The embedding lookups stay outside it: on CUDA their
        backward adds only the touched rows into .grad (EmbeddingRows)."""
        e, *ves = embedding_rows(inputs, self.vocab_size, self.embed, self.value_embeds)
        bigram, = embedding_rows(bigram_hash, self.bigram_vocab_size, self.bigram_embed)
        return (trunk or self.trunk)(e, ves, bigram, targets, cu_seqlens, max_seq_len, windows, mtp_weights)

    def trunk(self, e, ves, bigram, targets, cu_seqlens, max_seq_len, windows, mtp_weights):
        """The model from the looked-up rows (T, D): token embeddings e, a list of NUM_VALUE_EMBEDS value
        embeddings ves, bigram embeddings."""
        dt = self.embed.dtype
        short, long = windows.unbind(0)
        scalars = self.scalars
        attention_weights = iter(zip(self.attn_bank.unbind(0), self.attn_gate_bank.unbind(0)))  # in layer order
        mlp_banks = [pair.unbind(0) for pair in self.mlp_bank.unbind(0)]
        value_gates = self.ve_gate_bank.unbind(0)
        resid_attn, resid_mlp = (t.unbind(0) for t in self.resid_lambdas.to(dt).unbind(1))
        post = [p.flatten().unbind(0) for p in self.post_lambdas.to(dt).unbind(0)]
        x0_lambda, bigram_lambda = self.x0_lambdas.to(dt).unbind(0), self.bigram_lambdas.to(dt).unbind(0)

        smear = scalars[SMEAR_LAMBDA] * torch.sigmoid(e[1:, :GATE_DIM] @ self.smear_gate.mT)
        e = torch.cat([e[:1], e[1:] + smear * e[:-1]])
        x0 = norm(e)
        lane0, lane1 = x0 + bigram_lambda[0] * bigram, None
        skip = backout = None  # set by the layer that saves_skip and by the first two_lanes layer
        for i, layer in enumerate(LAYERS):
            c_fc, c_proj = mlp_banks[i]
            post_attn0, post_attn1, post_mlp0, post_mlp1 = post[i]  # into lane 0 / lane 1
            if not layer.attention:
                gate = torch.sigmoid(scalars[SKIP_LAMBDA]) * 2 * torch.sigmoid(x0[:, :GATE_DIM] @ self.skip_gate.mT)
                lane0 = lane0 + gate * skip
                lane0 = resid_mlp[i] * lane0 + post_mlp0 * mlp(norm(lane0), c_fc, c_proj)
                continue
            weights, gate = next(attention_weights)
            # every attention layer adds x0 and the bigram embedding back; layer 0's bigram share is
            # already in lane 0, which starts with it
            inject = x0_lambda[i] * x0 if i == 0 else x0_lambda[i] * x0 + bigram_lambda[i] * bigram
            table = layer.value_embed
            a = self.attn(norm(lane0), layer, weights, gate, scales=(scalars[2 * i], scalars[2 * i + 1]),
                          cu_seqlens=cu_seqlens, max_seq_len=max_seq_len, window=long if layer.long_window else short,
                          value=None if table is None else (ves[table], value_gates[table]))
            if not layer.two_lanes:
                lane0 = resid_attn[i] * lane0 + a + inject
                if layer.saves_skip:
                    skip = lane0
                lane0 = resid_mlp[i] * lane0 + post_mlp0 * mlp(norm(lane0), c_fc, c_proj)
            else:
                first_two_lane = lane1 is None
                if first_two_lane:
                    lane1 = lane0
                lane0 = resid_attn[i] * lane0 + post_attn0 * a + inject
                lane1 = resid_attn[i] * lane1 + post_attn1 * a
                m = mlp(norm(lane1), c_fc, c_proj)
                lane0 = resid_mlp[i] * lane0 + post_mlp0 * m
                lane1 = resid_mlp[i] * lane1 + post_mlp1 * m
                if first_two_lane:
                    backout = lane0
        x = norm((lane0 + lane1) / 2 - scalars[BACKOUT_LAMBDA] * backout)
        if mtp_weights is None:
            return eval_loss(x, self.lm_head, targets)
        return training_loss(x, self.lm_head, targets, mtp_weights)


# ----------------------------------------------------------------------------------------------
# Optimizer: one object for all parameters. NorMuon (Nesterov momentum, Polar Express,
# variance reduction, cautious weight decay) for the attention and MLP banks; Adam with cautious
# weight decay, updated on odd steps and on the split step (Schedule.adam_step), for everything else.
#
# Gradients are SUMMED across ranks: the 1/world factor is folded into the loss scale (1/8 for
# every world size), so NCCL and gloo run the same code and every world size the same math.


# Symmetric products for Polar Express: only the blocks on and above the diagonal are computed,
# each off-diagonal block is stored twice (itself and its mirror).


@triton.jit
def _symmetric_matmul_kernel(
    a_ptr, out_ptr, M, K,
    stride_ab, stride_am, stride_ak,
    stride_ob, stride_om, stride_on,
    alpha, beta,
    ADD_SCALED_INPUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = alpha * A @ A^T (+ beta * A when ADD_SCALED_INPUT; then A is square)."""
    num_blocks = tl.cdiv(M, BLOCK_M)
    block_m = tl.program_id(0) // num_blocks
    block_n = tl.program_id(0) % num_blocks
    if block_m > block_n:
        return
    a_ptr += tl.program_id(1).to(tl.int64) * stride_ab
    out_ptr += tl.program_id(1).to(tl.int64) * stride_ob
    rows_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = block_n * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + cols)[None, :] < K
        a = tl.load(a_ptr + rows_m[:, None] * stride_am + (k0 + cols)[None, :] * stride_ak,
                    mask=(rows_m[:, None] < M) & k_mask, other=0.0)
        b = tl.load(a_ptr + rows_n[:, None] * stride_am + (k0 + cols)[None, :] * stride_ak,
                    mask=(rows_n[:, None] < M) & k_mask, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    acc *= tl.cast(alpha, tl.float32)
    out_mask = (rows_m[:, None] < M) & (rows_n[None, :] < M)
    if ADD_SCALED_INPUT:
        a_block = tl.load(a_ptr + rows_m[:, None] * stride_am + rows_n[None, :] * stride_ak,
                          mask=out_mask, other=0.0)
        acc += tl.cast(beta, tl.float32) * a_block.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows_m[:, None] * stride_om + rows_n[None, :] * stride_on, out, mask=out_mask)
    if block_m < block_n:
        tl.store(out_ptr + rows_n[:, None] * stride_om + rows_m[None, :] * stride_on,
                 tl.trans(out), mask=tl.trans(out_mask))


def _as_batched(t):
    return t if t.ndim == 3 else t.unsqueeze(0)


def _launch_symmetric(a, out, alpha, beta, add_scaled_input, block_m=128, block_k=64, num_warps=8, num_stages=4):
    """a: (B, M, K), possibly a transposed view; out: (B, M, M)."""
    batch, m, k = a.shape
    num_blocks = triton.cdiv(m, block_m)
    _symmetric_matmul_kernel[(num_blocks * num_blocks, batch)](
        a, out, m, k,
        a.stride(0), a.stride(1), a.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        alpha, beta,
        ADD_SCALED_INPUT=add_scaled_input, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def XXT(a, out, **config):
    """out = a @ a^T for a of shape (M, K) or (B, M, K); out (M, M) or (B, M, M)."""
    return _launch_symmetric(_as_batched(a), _as_batched(out), 1.0, 0.0, False, **config).view_as(out)


def XTX(a, out, **config):
    """out = a^T @ a for a of shape (M, K) or (B, M, K); out (K, K) or (B, K, K)."""
    return _launch_symmetric(_as_batched(a).mT, _as_batched(out), 1.0, 0.0, False, **config).view_as(out)


def bA_plus_cAA(A, out, b, c, **config):
    """out = b * A + c * A @ A^T (Polar Express's step matrix) for symmetric square A (M, M) or (B, M, M)."""
    return _launch_symmetric(_as_batched(A), _as_batched(out), c, b, True, **config).view_as(out)


# Fused Nesterov momentum + Polar Express orthogonalisation (one compiled function per shape).

POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


GRAM_KERNEL_MIN_BATCH_TALL, GRAM_KERNEL_MAX_BATCH_WIDE = 6, 5
# X / (1.02 ||X||_F + 1e-6) puts every singular value below 1, where the iteration converges (Polar
# Express, Amsel et al. 2025, normalises by the Frobenius norm; 2% is the record's margin for bf16).
NORM_MARGIN, NORM_EPS = 1.02, 1e-6
MATMUL_ADD_MIN_ROWS = 1024  # above this many rows a matmul plus an in-place add beats baddbmm's defensive copy


def gram(X, out, tall):
    """out = X^T X (tall) or X X^T for a batch X, through the symmetric kernel only for the CUDA
    shapes where it measured faster than cuBLAS on an H200 (kernels_test.py --bench --sweep)."""
    if X.is_cuda and (X.size(0) >= GRAM_KERNEL_MIN_BATCH_TALL if tall else X.size(0) <= GRAM_KERNEL_MAX_BATCH_WIDE):
        return (XTX if tall else XXT)(X, out)
    return torch.bmm(X.mT, X, out=out) if tall else torch.bmm(X, X.mT, out=out)


def polar_step_matrix(A, out, b, c):
    """out = b A + c A A for symmetric A: the symmetric kernel on CUDA (faster than baddbmm at every
    measured shape), baddbmm elsewhere."""
    if A.is_cuda:
        return bA_plus_cAA(A, out, b, c)
    return torch.baddbmm(A, A, A, beta=b, alpha=c, out=out)


def nesterov_polar_express(grad, momentum_buffer, momentum, compute_dtype=torch.bfloat16):
    """Nesterov update of momentum_buffer (in place), then Polar Express of the Nesterov
    gradient, for a batch of matrices (B, rows, cols). Returns X in compute_dtype.

    Tall matrices (rows > cols) iterate on X^T X so that X is never transposed.
    """
    momentum_buffer.lerp_(grad, 1 - momentum)
    grad = grad.lerp_(momentum_buffer, momentum)
    X = grad.to(compute_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * NORM_MARGIN + NORM_EPS)
    tall = X.size(-2) > X.size(-1)
    size = X.size(-1) if tall else X.size(-2)
    A = X.new_empty(X.size(0), size, size)
    B = torch.empty_like(A)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        gram(X, A, tall)
        polar_step_matrix(A, B, b, c)
        if not tall:
            X = torch.baddbmm(X, B, X, beta=a)
        elif X.size(-2) > MATMUL_ADD_MIN_ROWS:
            X = torch.bmm(X, B).add_(X, alpha=a)
        else:
            X = torch.baddbmm(X, X, B, beta=a)
    return X


@dataclass(frozen=True)
class ParamGroup:
    label: str
    attr: str = ""  # the GPT attribute, if not the label
    optim: str = "adam"  # or "normuon"
    comms: str = "replicated"  # or "sharded", "sharded_sparse"
    betas: tuple = (0.9, 0.99)
    lr_mul: float = 1.0
    wd_mul: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "attr", self.attr or self.label)


# Communication (the record's two orders). NorMuonAdam.step launches the reductions of the groups it
# updates all at once, in PARAM_GROUPS order (the "scatter order"); NCCL runs them one after another
# in that order, beside the updates. It then updates the groups in WORK_ORDER, each as soon as its own
# reduction is done, and launches each sharded group's gather right after its update. Replicated groups
# are all-reduced and updated whole on every rank; sharded ones reduce-scattered, updated a 1/world
# shard per rank, and all-gathered.
PARAM_GROUPS = (
    # first: the only groups reduced on every step (Adam's wait for an Adam step), so on the other
    # steps attn's update starts while mlp's reduction is still on the wire
    ParamGroup("attn", attr="attn_bank", optim="normuon", comms="sharded"),
    ParamGroup("mlp", attr="mlp_bank", optim="normuon", comms="sharded"),
    # a few KB each: quick to reduce, so the first Adam updates can start soon after the banks'
    ParamGroup("scalars", lr_mul=5, wd_mul=0),
    ParamGroup("smear_gate", lr_mul=0.01, wd_mul=0),
    ParamGroup("skip_gate", lr_mul=0.05, wd_mul=0),
    ParamGroup("attn_gate_bank"),
    ParamGroup("ve_gate_bank"),
    # while tied it also carries embed's gradient (added just before its reduction), and the step waits
    # for its gather to copy embed from it: reduced before the large tables, not behind them
    ParamGroup("lm_head", comms="sharded", betas=(0.5, 0.95), wd_mul=150),
    # with 8 GPUs only the rows this step's tokens touched travel (before_forward told every rank which)
    ParamGroup("bigram_embed", comms="sharded_sparse", betas=(0.75, 0.95), lr_mul=75, wd_mul=5),
    ParamGroup("post_lambdas", betas=(0.9, 0.95), wd_mul=0),
    ParamGroup("x0_lambdas", betas=(0.9, 0.95), wd_mul=0),
    ParamGroup("bigram_lambdas", betas=(0.9, 0.95), wd_mul=0),
    ParamGroup("resid_lambdas", betas=(0.9, 0.95), lr_mul=5, wd_mul=0),
    # the largest dense transfers last (value_embed holds 5 vocabulary-sized tables; embed is reduced only
    # after the split): they run while the groups reduced before them are updated
    ParamGroup("value_embed", attr="value_embeds", comms="sharded", betas=(0.75, 0.95), lr_mul=75, wd_mul=5),
    ParamGroup("embed", comms="sharded", betas=(0.5, 0.95), wd_mul=150),
)
WORK_ORDER = (
    # small, cheap updates first, while the large reductions are still running
    "scalars", "smear_gate", "skip_gate", "attn_gate_bank", "ve_gate_bank", "post_lambdas", "x0_lambdas",
    "bigram_lambdas", "resid_lambdas",
    # the large Adam tables next: their gathers then overlap the banks' updates below
    "value_embed", "bigram_embed",
    # lm_head before embed: while tied, embed is written from lm_head's gathered whole
    "lm_head", "embed",
    # Polar Express, the longest updates, last: the gathers of everything above run meanwhile
    "attn", "mlp",
)


def adam_update(p, grad, exp_avg, exp_avg_sq, count, lr, decay, beta1, beta2, eps):
    """Adam with bias correction and cautious weight decay (only where the update and the weight
    agree in sign); p is updated in place in its own dtype. count, lr, decay: 0-d CPU tensors."""
    grad = grad.float()
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    update = exp_avg / (exp_avg_sq.sqrt() + eps) * (lr * (1 - beta2 ** count).sqrt() / (1 - beta1 ** count))
    weight = p.float()
    update = update + decay * weight * (update * weight > 0)
    p.copy_(weight - update)


def normuon_variance_reduction(X, v2, beta2):
    """Scale X by 1/sqrt(v2), v2 a running mean of X^2 over X's smaller dim (one value per row of a tall X,
    per column of a wide one; updated in place), keeping ||X||_F."""
    X = X.float()
    reduce_dim = -1 if X.size(-2) >= X.size(-1) else -2
    size = X.size(reduce_dim)
    mean_sq = X.square().mean(reduce_dim, keepdim=True)
    norm_before = (mean_sq.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    v2.lerp_(mean_sq, 1 - beta2)
    scale = v2.clamp_min(1e-10).rsqrt()
    norm_after = (mean_sq * size * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return X * scale * (norm_before / norm_after.clamp_min(1e-10))


def normuon_apply(p, mantissa, X, lr, decay):
    """p <- p - decay * lr * p * [X p >= 0] - lr * X. lr: per matrix (B, 1, 1); decay: 0-d.
    A bf16 p is extended by the uint16 mantissa (its lost lower 16 bits) to an exact fp32 weight."""
    if mantissa is None:
        weight = p.float()
    else:
        weight = ((p.view(torch.int16).to(torch.int32) << 16) | mantissa.to(torch.int32)).view(torch.float32)
    weight = weight - weight * ((X * weight) >= 0) * (decay * lr) - X * lr
    if mantissa is None:
        p.copy_(weight)
    else:
        bits = weight.view(torch.int32)
        p.view(torch.int16).copy_((bits >> 16).to(torch.int16))
        mantissa.copy_((bits & 0xFFFF).to(torch.uint16))


COMPILE_OPTIONS = dict(dynamic=False, fullgraph=True)  # every torch.compile here: static shapes, one graph


class SparseBigramExchange:
    """The bigram gradient between ranks, only its touched rows: of the table's 251,520 rows, a rank's
    step touches at most one per token (49,152 at stage 3 on 8 GPUs). Each rank sends the rows touched
    since the last Adam step to their owner, who adds them into its shard. Which rows go where travels
    first, over a CPU group, sent before the forward is launched: the host learns the counts without
    waiting for the GPU (NCCL would queue them behind the forward pass)."""

    def __init__(self, table_rows, rank, world_size):
        self.rank, self.world_size, self.rows_per_rank = rank, world_size, table_rows // world_size
        self.cpu_group = dist.new_group(backend="gloo")
        self.forget()

    def forget(self):
        self.touched, self.sent = [], None

    def touch(self, bigram_hashes):
        self.touched += [np.asarray(hashes) for hashes in bigram_hashes]

    def send_rows(self):
        """Exchange which touched rows go to which owner (counts, then indices), ahead of the gradients."""
        rows = np.unique(np.concatenate(self.touched)) if self.touched else np.zeros(0, np.int64)
        self.touched = []
        rows = torch.from_numpy(rows[rows // self.rows_per_rank != self.rank].astype(np.int64))  # sorted: by owner
        send_counts = torch.bincount(rows // self.rows_per_rank, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.cpu_group)
        send_counts, recv_counts = send_counts.tolist(), recv_counts.tolist()
        recv_rows = torch.empty(sum(recv_counts), dtype=torch.int64)
        work = dist.all_to_all_single(recv_rows, rows, recv_counts, send_counts, group=self.cpu_group,
                                      async_op=True)
        self.sent = (rows, send_counts, recv_rows, recv_counts, work)

    def launch(self, grad, chunk):
        """Send the touched rows of grad to their owners; returns a function that waits and adds the
        received rows into this rank's chunk of grad, and gives it."""
        if self.sent is None:  # before_forward was not told of this Adam step
            self.send_rows()
        send_rows, send_counts, recv_rows, recv_counts, rows_work = self.sent
        self.sent = None
        recv_values = grad.new_empty(len(recv_rows), grad.size(1))
        values_work = dist.all_to_all_single(recv_values, grad[send_rows.to(grad.device, non_blocking=True)],
                                             recv_counts, send_counts, async_op=True)

        def add_received_rows():
            rows_work.wait()
            values_work.wait()
            local_rows = (recv_rows - self.rank * chunk.size(0)).to(grad.device, non_blocking=True)
            return chunk.index_add_(0, local_rows, recv_values)
        return add_received_rows


class NorMuonAdam:
    """Optimizer of every GPT parameter, configured by PARAM_GROUPS. step() reduces gradients
    across ranks (explicitly, in scatter order), updates in work order and gathers shards back."""

    def __init__(self, model, rank=0, world_size=1, sparse_bigram=False, adam_lr=0.008, adam_eps=1e-10,
                 adam_weight_decay=0.005, muon_lr=0.023, muon_beta2=0.95, muon_weight_decay=1.2, communicate=True):
        """communicate=False: update this rank's shards as in a world_size run, but exchange nothing
        (profile_gpt.py's eight-GPU emulation: one rank's optimizer work without the network)."""
        self.model, self.rank, self.world_size, self.communicate = model, rank, world_size, communicate
        self.bigram_exchange = (SparseBigramExchange(model.bigram_embed.size(0), rank, world_size)
                                if sparse_bigram and world_size > 1 and communicate else None)
        self.adam_lr, self.adam_eps, self.adam_weight_decay = adam_lr, adam_eps, adam_weight_decay
        self.muon_lr, self.muon_beta2, self.muon_weight_decay = muon_lr, muon_beta2, muon_weight_decay
        cuda = model.embed.is_cuda
        self._adam, self._variance_reduction, self._apply, self._polar_express = (
            torch.compile(fn, **COMPILE_OPTIONS) if cuda else fn  # wrappers of one function share its graphs
            for fn in (adam_update, normuon_variance_reduction, normuon_apply, nesterov_polar_express))
        self._compute_dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter has no bf16
        # changing scalars enter compiled code as 0-d CPU tensors, so new values do not recompile
        self._lr, self._decay, self._momentum = torch.zeros(()), torch.zeros(()), torch.zeros(())
        self.groups = {g.label: g for g in PARAM_GROUPS}
        self.params = {g.label: getattr(model, g.attr) for g in PARAM_GROUPS}
        self.state = {label: self._init_state(self.groups[label], p) for label, p in self.params.items()}
        self.tied = True  # embed is lm_head^T until the split step

    # --- views and state ---

    def _view(self, label):
        """The tensor that is sharded along dim 0: banks as stacks of matrices."""
        p = self.params[label]
        if label == "attn":
            return p.view(-1, p.size(-1), p.size(-1))
        if label == "mlp":
            return p.view(-1, *p.shape[-2:])
        return p

    def _chunk(self, label, tensor):
        """This rank's rows of a sharded tensor (all of it when replicated or alone)."""
        if self.world_size == 1 or self.groups[label].comms == "replicated":
            return tensor
        rows = tensor.size(0) // self.world_size
        return tensor[self.rank * rows:(self.rank + 1) * rows]

    def _init_state(self, group, p):
        chunk = self._chunk(group.label, self._view(group.label))
        if group.optim == "adam":
            return {"exp_avg": torch.zeros_like(chunk, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(chunk, dtype=torch.float32), "count": torch.zeros(())}
        rows, cols = chunk.shape[-2:]
        lr_scale = torch.full((chunk.size(0), 1, 1), group.lr_mul * max(1.0, rows / cols) ** 0.5,
                              device=chunk.device)
        if group.label == "mlp":  # c_proj matrices (odd indices of the bank view) learn twice as fast
            first = self.rank * chunk.size(0)  # index of this chunk's first matrix in the bank view
            lr_scale[(torch.arange(chunk.size(0)) + first) % 2 == 1] *= 2
        v2_shape = (chunk.size(0), rows, 1) if rows >= cols else (chunk.size(0), 1, cols)
        return {"momentum_buffer": torch.zeros_like(chunk, dtype=torch.float32),
                "v2": torch.zeros(v2_shape, dtype=torch.float32, device=chunk.device),
                "mantissa": torch.zeros_like(chunk, dtype=torch.uint16) if chunk.dtype == torch.bfloat16 else None,
                "lr_scale": lr_scale}

    def state_dict(self):
        return {"tied": self.tied,
                "state": {label: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                          for label, s in self.state.items()}}

    def load_state_dict(self, state_dict):
        self.tied = state_dict["tied"]
        for label, saved in state_dict["state"].items():
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self.state[label][key].copy_(value)
        if self.bigram_exchange:
            self.bigram_exchange.forget()

    def before_forward(self, bigram_hashes, adam_step):
        """The optimizer's part of a step before its forward is launched: the sparse bigram exchange
        learns the rows this step touches (bigram_hashes: the host-side hashes of this rank's
        micro-batches) and, on an Adam step, sends which go to which owner (SparseBigramExchange)."""
        if self.bigram_exchange:
            self.bigram_exchange.touch(bigram_hashes)
            if adam_step:
                self.bigram_exchange.send_rows()

    # --- the step ---

    def _launch_reduction(self, label):
        """Start reducing a gradient; returns a function that waits and gives this rank's chunk."""
        grad = self.params[label].grad.view_as(self._view(label))
        comms = self.groups[label].comms
        if self.world_size == 1 or not self.communicate:
            return functools.partial(self._chunk, label, grad)
        if comms == "sharded_sparse" and self.bigram_exchange:
            return self.bigram_exchange.launch(grad, self._chunk(label, grad))
        if comms == "replicated":
            reduced = grad
            work = dist.all_reduce(grad, async_op=True)
        else:
            reduced = grad.new_empty(self._chunk(label, grad).shape)
            work = dist.reduce_scatter_tensor(reduced, grad, async_op=True)

        def wait_for_reduction():
            work.wait()
            return reduced
        return wait_for_reduction

    def _update(self, label, grad_chunk, lr_multiplier, momentum):
        group, state = self.groups[label], self.state[label]
        p_chunk = self._chunk(label, self._view(label)).detach()
        if group.optim == "adam":
            lr = self.adam_lr * lr_multiplier * group.lr_mul
            state["count"] += 1
            self._lr.fill_(lr)
            self._decay.fill_(lr * lr * self.adam_weight_decay * group.wd_mul)
            self._adam(p_chunk, grad_chunk, state["exp_avg"], state["exp_avg_sq"], state["count"], self._lr,
                       self._decay, group.betas[0], group.betas[1], self.adam_eps)
            return
        lr = self.muon_lr * lr_multiplier
        self._momentum.fill_(momentum)
        self._lr.fill_(lr)
        self._decay.fill_(self.muon_weight_decay * group.wd_mul * lr)
        X = self._polar_express(grad_chunk.float(), state["momentum_buffer"], self._momentum,
                                compute_dtype=self._compute_dtype)
        X = self._variance_reduction(X, state["v2"], self.muon_beta2)
        self._apply(p_chunk, state["mantissa"], X, self._lr * state["lr_scale"], self._decay)

    def _launch_gather(self, label):
        if self.world_size == 1 or not self.communicate or self.groups[label].comms == "replicated":
            return None
        view = self._view(label).detach()
        # the chunk is copied out: an input inside the output buffer is not safe on every backend
        return dist.all_gather_into_tensor(view, self._chunk(label, view).clone(), async_op=True)

    @torch.no_grad()
    def step(self, lr_multiplier, momentum, adam_step):
        """One update: NorMuon parameters always, Adam parameters only when adam_step (their
        gradients otherwise keep accumulating). Zeroes the gradients it consumed in place: they are
        the tensors that captured CUDA graphs accumulate into."""
        active = [g.label for g in PARAM_GROUPS if g.optim == "normuon" or adam_step]
        if self.tied and adam_step:
            active.remove("embed")
        reductions = {}
        for label in active:  # scatter order
            if label == "lm_head" and self.tied:
                transpose_add(self.params["embed"].grad, self.params["lm_head"].grad)
            reductions[label] = self._launch_reduction(label)
        gathers = []
        for label in WORK_ORDER:
            if label not in reductions:
                continue
            self._update(label, reductions[label](), lr_multiplier, momentum)
            gather = self._launch_gather(label)
            if label == "lm_head" and self.tied:  # embed mirrors lm_head: it needs the whole of it now
                if gather is not None:
                    gather.wait()
                transpose_copy(self.params["lm_head"].detach(), self.params["embed"].detach())
            elif gather is not None:
                gathers.append(gather)
        for gather in gathers:
            gather.wait()
        consumed = active + (["embed"] if self.tied and adam_step else [])
        torch._foreach_zero_([self.params[label].grad for label in consumed])

    def untie(self):
        """After the split step's (tied) update: embed gets lm_head's Adam moments, transposed, and
        its update count; from now on the two are separate parameters."""
        lm_state, embed_state = self.state["lm_head"], self.state["embed"]
        for key in ("exp_avg", "exp_avg_sq"):
            full = lm_state[key]
            if self.world_size > 1:
                full = full.new_empty(self.params["lm_head"].shape)
                dist.all_gather_into_tensor(full, lm_state[key])
            embed_state[key].copy_(self._chunk("embed", transpose_copy(full, full.new_empty(full.mT.shape))))
        embed_state["count"].copy_(lm_state["count"])
        self.tied = False


# ----------------------------------------------------------------------------------------------
# Schedule: three stages of the scheduled steps, then an extension at the last stage's batch.


@dataclass(frozen=True)
class Stage:
    name: str
    batch_tokens: int  # global, per step
    max_seq_len: int
    windows: tuple  # (short, long) attention windows in WINDOW_BLOCKs
    lr_mul: float  # learning-rate multiplier, until the cooldown takes it to COOLDOWN_END_MULTIPLIER
    mtp_start: tuple  # multi-token prediction weights at the stage's first step ...
    mtp_end: tuple  # ... and at its (exclusive) end
    share: int = 1  # its part of the scheduled steps, against the sum of the stages' shares


STAGES = (
    Stage("stage 1", batch_tokens=131072, max_seq_len=896, windows=(1, 3), lr_mul=1.0,
          mtp_start=(1.0, 0.5, 0.25), mtp_end=(1.0, 0.5, 0.0)),
    Stage("stage 2", batch_tokens=262144, max_seq_len=2048, windows=(3, 7), lr_mul=1.52,
          mtp_start=(1.0, 0.5), mtp_end=(1.0, 0.0)),
    Stage("stage 3", batch_tokens=393216, max_seq_len=2048, windows=(5, 11), lr_mul=1.73,
          mtp_start=(1.0,), mtp_end=(1.0,)),
)
# after the scheduled steps, --num_extension_iterations of the last stage's batch with wider windows
# (its lr_mul is None: it runs after the cooldown, at COOLDOWN_END_MULTIPLIER)
EXTENSION = Stage("extension", batch_tokens=393216, max_seq_len=2048, windows=(6, 13), lr_mul=None,
                  mtp_start=(1.0,), mtp_end=(1.0,), share=0)
ALL_STAGES = (*STAGES, EXTENSION)
FINAL_VAL_WINDOWS = (6, 20)  # the final validation looks further, without a YaRN update
VAL_BATCH_TOKENS = 2_097_152  # per val step, 8 slots of 262,144 for every world size
VAL_LOCAL_TOKENS = VAL_BATCH_TOKENS // SLOTS_PER_STEP
LOSS_SCALE = 1 / SLOTS_PER_STEP  # 1/grad_accum, with the 1/world of the average folded in
COOLDOWN_START_FRAC, COOLDOWN_END_MULTIPLIER = 0.4, 0.15
MOMENTUM_RISE_STEPS, MOMENTUM_COOLDOWN_STEPS = 300, 50
MOMENTUM_MIN, MOMENTUM_RISE = 0.85, 0.10  # NorMuon's: up by RISE over the first steps, back over the last


class Schedule:
    def __init__(self, num_scheduled, num_extension):
        self.num_scheduled, self.total = num_scheduled, num_scheduled + num_extension
        shares = [0, *itertools.accumulate(stage.share for stage in STAGES)]
        self.starts = [round(share * num_scheduled / shares[-1]) for share in shares]  # 0/483/967/1450 of 1450
        self.split_step = self.starts[-2]  # embed and lm_head separate after the last stage's first update

    def stage_ranges(self):
        """(name, first step, end step) of every stage that has steps, the extension last."""
        ends = self.starts[1:] + [self.total]
        return [(stage.name, first, end) for stage, first, end in zip(ALL_STAGES, self.starts, ends) if end > first]

    def stage_index(self, step):
        """The stage's index in ALL_STAGES: the extension is the last."""
        return sum(step >= s for s in self.starts[1:])

    def stage(self, step):
        return ALL_STAGES[self.stage_index(step)]

    def mtp_weights(self, step):
        i = self.stage_index(step)
        stage = self.stage(step)
        if i == len(STAGES):  # the extension
            return stage.mtp_start
        t = (step - self.starts[i]) / (self.starts[i + 1] - self.starts[i])
        return tuple(a + t * (b - a) for a, b in zip(stage.mtp_start, stage.mtp_end))

    def lr_multiplier(self, step):
        """The stage's lr_mul, taken linearly to COOLDOWN_END_MULTIPLIER from COOLDOWN_START_FRAC of the
        scheduled steps to their end; the extension stays there."""
        if step >= self.num_scheduled:
            return COOLDOWN_END_MULTIPLIER
        cooldown_start = int(self.num_scheduled * COOLDOWN_START_FRAC)
        t = max(0.0, (step - cooldown_start) / (self.num_scheduled - cooldown_start))
        return self.stage(step).lr_mul * (1 - t) + COOLDOWN_END_MULTIPLIER * t

    def momentum(self, step):
        warm = MOMENTUM_MIN + MOMENTUM_RISE * min(1.0, step / MOMENTUM_RISE_STEPS)
        cool_start = self.total - MOMENTUM_COOLDOWN_STEPS
        return warm - MOMENTUM_RISE * max(0.0, (step - cool_start) / MOMENTUM_COOLDOWN_STEPS)

    def adam_step(self, step):
        """Adam updates on odd steps; the split step is always one."""
        return step % 2 == 1 or step == self.split_step

    def warm_up_steps(self):
        """Steps that run every graph and optimizer path: the first two of every stage and of the
        extension (both Adam parities; the split step is stage 3's first, the untied optimizer's
        first step the next)."""
        return sorted({s + i for s in self.starts for i in (0, 1) if s + i < self.total})


# ----------------------------------------------------------------------------------------------
# Main: torchrun (or plain python, one process) on a world size that divides 8. In launch order:
# the arguments, the pre-flight (every check that needs no GPU), the trainer (a step's mechanics),
# the warm-up with its compile workers, the CUDA graphs' capture, the timed loop and the summary.
# profile_gpt.py drives the same pieces to profile a stage.


PERSISTENT_ROW_MAX = 1024  # Inductor's own limit on a row it holds in registers for a reduction along it
CACHE_KEY_TAG = "+persistent-row-reductions"  # appended to any tag of the user's


def persistent_row_reductions(default):
    """Inductor's choice of a persistent reduction (each row loaded once and held in registers, instead
    of a loop over it per pass), extended to rows it marks DEFAULT instead of INNER."""
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    def choose(features, cooperative_reduction):
        return default(features, cooperative_reduction) or (
            not cooperative_reduction and features.get_reduction_hint() == ReductionHint.DEFAULT
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_MAX))
    choose.default = default
    return choose


def configure_torch():
    """Every process-wide setting, made by main and by each compile worker: importing this file
    changes nothing."""
    # FA4 keeps its compiled kernels on disk, as Inductor and Triton do, so a warm start skips its
    # JIT (set to 0 to opt out; read when flash_attn.cute is first imported).
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    # Each parameter shape compiles its own Adam graph, each stage its own model graphs.
    torch._dynamo.config.recompile_limit = 64
    # The model's autograd Functions (FP8 loss, ReLU^2 MLP) are traced whole into its graphs, so
    # AOTAutograd's cache may keep those graphs. By default it skips every graph holding one, and each
    # start traced each model graph through AOTAutograd again (7-17 s per graph on one H200).
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    # A norm backward that also adds a gate's gradient reads that (T, GATE_DIM) slice at row stride
    # GATE_DIM; Inductor then marks the whole kernel DEFAULT and loops over every row twice. Held in
    # registers, the looped norm backwards of a stage-3 micro-batch drop from 2.8 to 0.3 ms on one H200.
    from torch._inductor.choices import InductorChoices
    default = InductorChoices.should_use_persistent_reduction
    InductorChoices.should_use_persistent_reduction = staticmethod(
        persistent_row_reductions(getattr(default, "default", default)))  # wrapped once, however often called
    # The compile caches' keys do not see that choice: a tag in them keeps graphs compiled without it
    # (by an earlier version of this script) from being loaded.
    if not torch.compiler.config.cache_key_tag.endswith(CACHE_KEY_TAG):
        torch.compiler.config.cache_key_tag += CACHE_KEY_TAG


def hyperparameter(default, help, shown_default=None):
    """A command-line field; --help shows shown_default where the default itself would mislead."""
    return field(default=default, metadata={"help": help, "shown_default": shown_default})


@dataclass
class Hyperparameters:
    train_files: str = hyperparameter(os.path.join(DATA_DIR, "fineweb10B", "fineweb_train_*.bin"),
                                      "training shards (a glob), read in sorted order",
                                      "data/fineweb10B/fineweb_train_*.bin beside this script")
    val_files: str = hyperparameter(os.path.join(DATA_DIR, "fineweb10B", "fineweb_val_*.bin"),
                                    "validation shards (a glob): the first val_tokens + 1 tokens are read",
                                    "data/fineweb10B/fineweb_val_*.bin beside this script")
    val_tokens: int = hyperparameter(10_485_760, f"validation tokens, a multiple of {VAL_BATCH_TOKENS:,}; "
                                                 "the record's rule is 10,485,760")
    num_scheduled_iterations: int = hyperparameter(1450, "steps of the three-stage schedule (at least 3)")
    num_extension_iterations: int = hyperparameter(40, "steps after it, at the last stage's batch, longer windows")
    val_loss_every: int = hyperparameter(250, "validate every this many steps, outside the clock (0: only at the end)")
    attention: str = hyperparameter("auto", "attention backend: auto is the fastest one installed")
    sparse_bigram: str = hyperparameter("auto", "send only the touched rows of the bigram gradient between GPUs "
                                                "(auto: with 8 GPUs and no gradient accumulation)")
    adam_lr: float = hyperparameter(0.008, "Adam learning rate (times each group's lr_mul in PARAM_GROUPS)")
    adam_weight_decay: float = hyperparameter(0.005, "Adam cautious weight decay (times lr^2 and wd_mul)")
    adam_eps: float = hyperparameter(1e-10, "Adam epsilon")
    muon_lr: float = hyperparameter(0.023, "NorMuon learning rate of the attention and MLP matrices")
    muon_weight_decay: float = hyperparameter(1.2, "NorMuon cautious weight decay (times lr^2 and each "
                                                   "matrix's lr scale)")
    muon_beta2: float = hyperparameter(0.95, "NorMuon second-moment decay of the variance reduction")
    save_checkpoint: bool = hyperparameter(False, "at the end, save model and optimizer to logs/<run_id>_rank<r>.pt")
    run_id: str = hyperparameter("", "the log is logs/<run_id>.txt, a new file", "a fresh uuid")
    seed: int = hyperparameter(0, "seed of the model's initialisation")
    parallel_compile: str = hyperparameter("auto", "worker processes compile the later stages' graphs during the "
                                                   "warm-up (auto: unless the caches hold them already)")
    cuda_graphs: bool = hyperparameter(True, "replay each stage's micro-batch (forward and backward) as one CUDA "
                                             "graph, captured after the warm-up, instead of launching ~700 kernels")


MAX_LEARNING_RATE = 10.0  # far above any that trains (the defaults are 0.008 and 0.023): larger ones are typos
# Adam computes in float32: a smaller epsilon is 0 there or a subnormal (which GPU arithmetic may flush
# to 0), and every parameter whose gradient is 0 (a table row no token touched) would get 0/0 = NaN
MIN_ADAM_EPS = torch.finfo(torch.float32).tiny
MAX_RUN_ID_CHARS = 200  # the longest file a run names, <run_id>_rank7_trace.json, stays within 255 bytes
CHOICES = {"attention": ATTENTION_BACKENDS, "sparse_bigram": ("auto", "on", "off"),
           "parallel_compile": ("auto", "on", "off")}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block and exit code 2
        message = re.sub(r"(--[a-z0-9_]+)/--[a-z0-9-]+", r"\1", message)  # a flag by one of its spellings
        if message.startswith("unrecognized arguments:") and any(map(os.path.exists, message.split()[2:])):
            raise UsageError(f"{message}: the shell expanded a glob; quote --train_files / --val_files patterns, "
                             "e.g. --train_files 'data/synthetic/fineweb_train_*.bin'")
        raise UsageError(f"{message} (python {self.prog} --help lists the flags)")


BOOLEANS = {"true": True, "on": True, "false": False, "off": False}


def parse_bool(text):
    if text.lower() not in BOOLEANS:
        raise argparse.ArgumentTypeError(f"expected true / on or false / off (or the bare flag), not {text!r}")
    return BOOLEANS[text.lower()]


def repeated_flag(argv):
    """The first flag given twice (either spelling), or None: with argparse the last would silently win.
    --check may repeat: run.sh appends its own to the user's arguments."""
    seen = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            if name in seen and name != "check":
                return name
            seen.add(name)
    return None


def parse_args(argv):
    """(Hyperparameters, check): every field as --name value (or --name-with-hyphens), and what --check
    asked for: None, "all" (arguments and data) or "arguments"."""
    parser = ArgumentParser(prog="train_gpt.py", allow_abbrev=False,
                            description="Train a GPT-2-small-class model, the speedrun way. Launch with ./run.sh, or "
                            "torchrun --standalone --nproc_per_node=8 train_gpt.py (or 1, 2, 4 GPUs). To profile a "
                            "stage: python profile_gpt.py --stage N with these flags.")
    parser.add_argument("--check", nargs="?", const="all", choices=("all", "arguments"),
                        help="check the arguments and every data file, print the plan and exit (needs no GPU); "
                             "--check arguments: the arguments and the launch only")
    for spec in fields(Hyperparameters):
        kind = {bool: parse_bool, int: int, float: float, str: str}[type(spec.default)]
        extra = (dict(nargs="?", const=True, metavar="{true,false,on,off}") if kind is parse_bool
                 else dict(choices=CHOICES.get(spec.name)))
        shown = spec.metadata["shown_default"] or spec.default
        help_text = f"{spec.metadata['help']} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        spellings = dict.fromkeys([f"--{spec.name}", f"--{spec.name.replace('_', '-')}"])
        parser.add_argument(*spellings, dest=spec.name, type=kind, default=spec.default, help=help_text, **extra)
    repeated = repeated_flag(argv)
    if repeated:
        raise UsageError(f"--{repeated} is given twice: give each flag once")
    args = vars(parser.parse_args(argv))
    check = args.pop("check")
    return Hyperparameters(**args), check


@dataclass(frozen=True)
class Run:
    """What a run derives from its arguments and its place among the ranks: the shard lists (resolved
    once), the schedule, gradient accumulation, the bigram exchange and the batch streams. The pre-flight,
    the compile workers and the trainer take them from here. Two choices are made where they are used:
    the attention backend (it needs the GPU: GPT) and the compile workers (they depend on the caches:
    warm_up)."""
    hp: Hyperparameters
    world_size: int
    rank: int = 0
    device: torch.device = None  # the pre-flight's walks need none

    @functools.cached_property
    def train_files(self):
        return shard_files(self.hp.train_files)

    @functools.cached_property
    def val_files(self):
        """The first validation shards, those that hold the val_tokens + 1 tokens validation reads."""
        return validation_files(self.hp.val_files, self.hp.val_tokens)

    @property
    def grad_accum(self):
        return SLOTS_PER_STEP // self.world_size

    @property
    def sparse_bigram(self):
        """Whether ranks exchange only the touched rows of the bigram gradient (NorMuonAdam)."""
        return {"auto": self.world_size == 8 and self.grad_accum == 1, "on": True, "off": False}[self.hp.sparse_bigram]

    @functools.cached_property
    def schedule(self):
        return Schedule(self.hp.num_scheduled_iterations, self.hp.num_extension_iterations)

    def train_batches(self, stage):
        """This rank's training micro-batches from the first shard on, at stage's shapes."""
        return distributed_data_generator(self.hp.train_files, stage.batch_tokens, stage.max_seq_len,
                                          self.grad_accum, self.rank, self.world_size, self.device, self.train_files)

    def val_batches(self, val_tokens):
        """This rank's validation micro-batches of val_tokens tokens in all."""
        return validation_batches(self.val_files, val_tokens, VAL_LOCAL_TOKENS, self.grad_accum, self.rank,
                                  self.world_size, self.device)


def check_arguments(hp, world_size):
    """The values argparse cannot judge alone."""
    problems = []
    if hp.val_tokens <= 0 or hp.val_tokens % VAL_BATCH_TOKENS:
        problems.append(f"--val_tokens must be a positive multiple of the val batch, {VAL_BATCH_TOKENS:,} tokens "
                        f"(the record validates on {Hyperparameters.val_tokens:,}), not {hp.val_tokens:,}")
    if hp.num_scheduled_iterations < 3:
        problems.append(f"--num_scheduled_iterations must be at least 3 (a step per stage), "
                        f"not {hp.num_scheduled_iterations}")
    for name in ("num_extension_iterations", "val_loss_every"):
        if getattr(hp, name) < 0:
            problems.append(f"--{name} must be 0 or more, not {getattr(hp, name)}")
    for name in ("adam_lr", "muon_lr"):
        if not 0 < getattr(hp, name) <= MAX_LEARNING_RATE:
            problems.append(f"--{name} must be a positive number up to {MAX_LEARNING_RATE:g}, not {getattr(hp, name)}")
    if not MIN_ADAM_EPS <= hp.adam_eps < math.inf:
        problems.append(f"--adam_eps must be a finite number of at least {MIN_ADAM_EPS:.3g} (float32's smallest "
                        "normal number: below it Adam's float32 arithmetic may make it 0, and a zero gradient's "
                        f"update 0/0), not {hp.adam_eps}")
    for name in ("adam_weight_decay", "muon_weight_decay"):
        if not getattr(hp, name) >= 0 or math.isinf(getattr(hp, name)):
            problems.append(f"--{name} must be 0 or a positive number, not {getattr(hp, name)}")
    if not 0 <= hp.seed < 2**64:
        problems.append(f"--seed must lie in [0, 2^64), as torch.manual_seed takes it, not {hp.seed}")
    if not 0 <= hp.muon_beta2 < 1:
        problems.append(f"--muon_beta2 must lie in [0, 1), not {hp.muon_beta2}")
    if hp.sparse_bigram == "on" and world_size == 1:
        problems.append("--sparse_bigram on exchanges gradients between GPUs, and this run has one: use auto or off")
    if not re.fullmatch(r"[A-Za-z0-9._-]*", hp.run_id) or hp.run_id.startswith("."):
        problems.append(f"--run_id names a file in logs/: letters, digits, '.', '_' and '-' only, not {hp.run_id!r}")
    elif len(hp.run_id) > MAX_RUN_ID_CHARS:
        problems.append(f"--run_id names files in logs/: at most {MAX_RUN_ID_CHARS} characters, not {len(hp.run_id)}")
    if problems:
        raise UsageError("; ".join(problems))


def launch_environment():
    """(rank, world size, local rank) from torchrun's variables; one process when they are unset."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, str(default))
        if not re.fullmatch(r"[0-9]+", text.strip()):
            raise UsageError(f"{name}={text!r} is not a whole number: launch with torchrun, or unset it")
        values[name] = int(text)
    for name in ("RANK", "LOCAL_RANK"):
        if values["WORLD_SIZE"] and values[name] >= values["WORLD_SIZE"]:
            raise UsageError(f"{name}={values[name]} is not below WORLD_SIZE={values['WORLD_SIZE']}: launch with "
                             "torchrun, or unset them")
    return values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]


def launch_notes(world_size, check):
    """What the launch lacks for a run of several processes: torchrun's rendezvous variables. A run
    stops on it at once; --check, which a plan for a world size may run without torchrun (run.sh's
    does), notes it."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world_size > 1 and name not in os.environ]
    if not missing:
        return []
    message = (f"WORLD_SIZE={world_size} without {' and '.join(missing)}: processes find each other through "
               "torchrun, which sets them; launch with ./run.sh or torchrun")
    if not check:
        raise UsageError(message)
    return [f"note: {message}"]


OLDEST_TORCH = (2, 11)  # the first release whose flash attention takes a window


def check_torch_version(version):
    """version: torch.__version__. An older torch lacks the attention window and would fail later, in
    its own code, with a traceback."""
    if tuple(int(part) for part in version.split(".")[:2]) < OLDEST_TORCH:
        raise UsageError(f"PyTorch {version} is too old: train_gpt.py needs {'.'.join(map(str, OLDEST_TORCH))} "
                         "or newer (the README's install gives the tested one)")


def check_world_size(world_size):
    if world_size < 1 or SLOTS_PER_STEP % world_size:
        raise UsageError(f"world size {world_size} does not divide 8: launch with --nproc_per_node 1, 2, 4 or 8")


def log_path(run_id):
    return os.path.join("logs", f"{run_id}.txt")


def checkpoint_path(run_id, rank):
    return os.path.join("logs", f"{run_id}_rank{rank}.pt")


MIN_LOG_FREE_BYTES = 64 * 2**20  # a log holds this script and a line per step: far less


def checkpoint_bytes(world_size):
    """The bytes --save_checkpoint writes on this machine: every local rank's model and optimizer shard,
    counted on models on the meta device (no memory, no GPU)."""
    model = GPT(device="meta")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    states = [model.state_dict()] + [NorMuonAdam(model, rank, world_size).state_dict() for rank in range(local_ranks)]

    def size(state):
        if torch.is_tensor(state):
            return state.numel() * state.element_size()
        return sum(map(size, state.values())) if isinstance(state, dict) else 0
    return local_ranks * size(states[0]) + sum(map(size, states[1:]))


def check_outputs(hp, world_size, extra_paths=()):
    """The files this run will write (and extra_paths) must be new, in a logs/ folder that is one or can
    be made, with room for them."""
    if os.path.lexists("logs") and not os.path.isdir("logs"):
        raise UsageError("logs is not a folder (a file, or a link to none): runs write their logs into logs/ in "
                         "the current folder. Move it away, or run from another folder")
    folder = "logs" if os.path.isdir("logs") else "."
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write into {os.path.abspath(folder)}: runs write their logs into logs/ in the "
                         "current folder. Run from a folder you can write")
    needed = MIN_LOG_FREE_BYTES + (checkpoint_bytes(world_size) if hp.save_checkpoint else 0)
    free = shutil.disk_usage(folder).free
    if free < needed:
        what = f"the log and {needed / 2**30:.1f} GiB of checkpoints" if hp.save_checkpoint else "the log"
        raise UsageError(f"{os.path.abspath(folder)} has {free / 2**20:,.0f} MiB free, too little for {what}: free "
                         "space, or run from another folder")
    paths = [log_path(hp.run_id)]
    paths += [checkpoint_path(hp.run_id, rank) for rank in range(world_size)] if hp.save_checkpoint else []
    paths += extra_paths
    taken = [path for path in paths if os.path.lexists(path)]
    if taken:
        raise UsageError(f"{taken[0]} exists (an earlier run's, finished or failed): each run writes its own files, "
                         "so choose another --run_id, or delete it")


IDENTITY_BYTES = 2**20  # two files whose size and first and last MiB agree hold the same data


def file_identities(path):
    """What makes two paths the same data: the file itself (device and inode: symbolic and hard links),
    and its size with a digest of its first and last MiB (byte copies)."""
    status = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(IDENTITY_BYTES)
        f.seek(max(0, status.st_size - IDENTITY_BYTES))
        digest = hashlib.sha256(head + f.read()).hexdigest()
    return (status.st_dev, status.st_ino), (status.st_size, digest)


def check_distinct_files(train_files, val_files):
    """No data twice: not in the training files, nor in both training and validation."""
    seen = {}
    for flag, path in [("--train_files", p) for p in train_files] + [("--val_files", p) for p in val_files]:
        for identity in file_identities(path):
            if identity not in seen:
                seen[identity] = flag, path
                continue
            other_flag, other = seen[identity]
            if other_flag != flag:
                raise DataError(f"{other} ({other_flag}) and {path} ({flag}) hold the same data (one file, a link "
                                "or a copy): validation would score training tokens. Give the two patterns different "
                                "data.")
            raise DataError(f"{other} and {path} ({flag}) hold the same data (one file, a link or a copy): it would be "
                            "read twice. Remove one of them.")


def check_validation_data(run):
    """What validation reads, through validation_batches itself: token ids, BOS tokens, documents per window."""
    for _ in validation_batches(run.val_files, run.hp.val_tokens, VAL_LOCAL_TOKENS, SLOTS_PER_STEP, device="cpu"):
        pass


def walk_batches(reader, stages, what):
    """Draw the batches of these steps (a Stage each) from the first shard on, as the loader will, and
    check every micro-batch's documents. Returns (shards opened, tokens drawn)."""
    reader.rewind()
    drawn = 0
    for step, stage in enumerate(stages):
        local_tokens = stage.batch_tokens // SLOTS_PER_STEP
        try:
            slots = reader.next_step(local_tokens, stage.max_seq_len)
        except OutOfTrainingData:
            tokens = sum(shard_tokens(path) for path in reader.files)
            raise DataError(f"{reader.pattern!r} runs out at step {step} of {len(stages)}{what}: its "
                            f"{len(reader.files)} shard(s) hold {tokens:,} tokens. Add shards ({FETCH_HINT}), or "
                            "shorten the schedule. (Each document is cut to the stage's sequence length, "
                            f"{'/'.join(str(s.max_seq_len) for s in STAGES)} tokens, and the rest of it dropped: "
                            "long documents use the data up faster.)") from None
        for segments in slots:
            check_doc_count(len(segments), local_tokens, reader.path)  # as micro_batch will
        drawn += stage.batch_tokens + SLOTS_PER_STEP
    return reader.next_index, drawn


def other_draws(schedule):
    """(what, stages) of every other draw of training batches a run makes, each from the first shard:
    the warm-up, and one step at each stage's shapes (compile workers, CUDA graphs' capture)."""
    draws = [(" of the warm-up", [schedule.stage(step) for step in schedule.warm_up_steps()])]
    return draws + [(f" of {name}'s first micro-batch", [schedule.stage(first)])
                    for name, first, _ in schedule.stage_ranges()]


def preflight(run, extra_draws=()):
    """Check every data file and walk every batch the run will draw (and extra_draws, as other_draws
    gives them), as the loader will, on the CPU, before any GPU work. Returns the plan as lines; raises
    DataError on the first problem."""
    hp, schedule = run.hp, run.schedule
    available = sum(shard_tokens(path) for path in run.train_files)  # checks every header and size, used or not
    check_distinct_files(run.train_files, run.val_files)
    check_validation_data(run)
    # a step draws at least its batch and a token per slot: a schedule past that is refused before the
    # walk, whose work grows with the steps
    least = sum((end - first) * (schedule.stage(first).batch_tokens + SLOTS_PER_STEP)
                for _, first, end in schedule.stage_ranges())
    if least > available:
        raise DataError(f"{hp.train_files!r} holds {available:,} tokens, and the schedule's {schedule.total:,} steps "
                        f"draw at least {least:,}: add shards ({FETCH_HINT}), or shorten the schedule")
    reader = ShardReader(hp.train_files, run.train_files)  # one for every draw: the first shard read once more at most
    try:
        shards, drawn = walk_batches(reader, [schedule.stage(step) for step in range(schedule.total)], "")
        for what, stages in other_draws(schedule) + list(extra_draws):
            walk_batches(reader, stages, what)
    finally:
        reader.close()
    lines = [f"plan: {schedule.total} steps, world size {run.world_size} (gradient accumulation {run.grad_accum})"]
    for name, first, end in schedule.stage_ranges():
        stage = schedule.stage(first)
        short, long = (WINDOW_BLOCK * blocks for blocks in stage.windows)
        lines.append(f"  {name}: steps {first}-{end - 1}, {stage.batch_tokens:,} tokens/step, documents cut at "
                     f"{stage.max_seq_len}, windows {short}/{long}")
    lines.append(f"  train: {shards} of the {len(run.train_files)} shard(s) of {hp.train_files!r}, "
                 f"{drawn:,} tokens drawn (a shard's tail that cannot hold a whole step is skipped)")
    lines.append(f"  val: {hp.val_tokens:,} + 1 tokens from {len(run.val_files)} shard(s) of {hp.val_files!r}")
    return lines


def no_extras(*_):
    return []


def prepare(hp, check, extra_draws=no_extras, extra_outputs=no_extras):
    """Everything before the GPU work, for the arguments parse_args gives: the launch, the arguments, the
    outputs and (unless --check arguments) the pre-flight; then the GPU is chosen. Returns (Run, the
    plan's lines), or None where --check ends the run, having printed its result. A tool adds its own
    draws and files (profile_gpt.py): extra_draws(schedule) as other_draws gives them (checked with the
    arguments: it may raise UsageError), extra_outputs(run_id, world_size) as paths."""
    check_torch_version(torch.__version__)
    configure_torch()
    rank, world_size, local_rank = launch_environment()
    check_world_size(world_size)
    check_arguments(hp, world_size)
    run = Run(hp, world_size, rank, torch.device("cuda", local_rank))
    draws = extra_draws(run.schedule)
    if check:  # a GPU run learns it from attention_backend, after the GPU is chosen (no import before that)
        check_fa4_installed(hp.attention)
    hp.run_id = hp.run_id or str(uuid.uuid4())  # several ranks: rank 0's, once they connect (session)
    check_outputs(hp, world_size, extra_outputs(hp.run_id, world_size))
    notes = launch_notes(world_size, check)
    if check == "arguments":
        if rank == 0:
            print_lines([f"arguments checked for world size {world_size}", *notes])
        return None
    t0 = time.perf_counter()
    plan = preflight(run, draws)
    plan.append(f"pre-flight checks passed in {time.perf_counter() - t0:.1f}s")
    if check:
        if rank == 0:
            print_lines(plan + notes)
        return None
    if not re.fullmatch(r"[1-9][0-9]*", os.environ.get("OMP_NUM_THREADS", "").strip()):
        # Unset (or unreadable: OpenMP has said so and ignored it), one thread, as torchrun sets, so a plain
        # run's host data path matches a torchrun one: copies above 32768 elements (stage 3's micro-batches)
        # would otherwise go to an OpenMP pool of every core.
        torch.set_num_threads(1)
    check_gpu(run.device)
    return run, plan


def check_gpu(device):
    """The GPU this rank trains on: there, and a Hopper or newer. Made current."""
    if not torch.cuda.is_available():
        raise UsageError("no CUDA GPU found: this script trains on NVIDIA GPUs (H100 / H200); "
                         "--check validates the data without one")
    if device.index >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK={device.index}, but this machine has {torch.cuda.device_count()} GPU(s) in "
                         "view (CUDA_VISIBLE_DEVICES): start at most that many processes per machine")
    if torch.cuda.get_device_capability(device) < (9, 0):
        major, minor = torch.cuda.get_device_capability(device)
        raise UsageError(f"{torch.cuda.get_device_name(device)} is sm{major}{minor}: the kernels need sm90 or newer "
                         "(Hopper: H100 / H200), for TMA descriptors and FP8 matrix products")
    torch.cuda.set_device(device)


class Logger:
    """Rank 0 prints and appends to logs/<run_id>.txt; other ranks stay silent."""

    def __init__(self, run_id, master):
        self.master = master
        self.path = log_path(run_id)
        if master:
            os.makedirs("logs", exist_ok=True)
            try:  # created here, not at the first line: a run started since check_outputs cannot share it
                open(self.path, "x").close()
            except FileExistsError:
                raise UsageError(f"{self.path} exists: another run with this --run_id started meanwhile; choose "
                                 "another") from None

    def __call__(self, line="", console=True):
        if self.master:
            try:
                with open(self.path, "a") as f:
                    f.write(line + "\n")
            except OSError as e:
                raise UsageError(f"cannot write {self.path} ({e.strerror}): free space on its disk") from None
            if console:
                print(line, flush=True)

    def header(self):
        """The script itself, versions and nvidia-smi: a log is a self-contained record. If it cannot be
        written, the log is removed: no empty or partial log is left behind."""
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            smi = f"nvidia-smi failed: {e}"
        try:
            with open(__file__) as f:
                self(f.read(), console=False)
            self("=" * 100, console=False)
            self(f"Python {sys.version.split()[0]}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}, "
                 f"Triton {triton.__version__}")
            self(smi, console=False)
            self("=" * 100, console=False)
        except UsageError:
            if self.master:
                os.remove(self.path)
            raise


@contextlib.contextmanager
def session(run, plan):
    """The process group (several GPUs) and the log, opened with its header and the plan, for the body
    of a run: yields the log. The group is destroyed after, however the body ends."""
    if run.world_size > 1:
        dist.init_process_group("nccl", device_id=run.device)
        run_ids = [run.hp.run_id]  # without --run_id, every rank drew its own: all take rank 0's
        dist.broadcast_object_list(run_ids, src=0)
        run.hp.run_id = run_ids[0]
    try:
        log = Logger(run.hp.run_id, run.rank == 0)
        log.header()
        log(f"world size {run.world_size}, gradient accumulation {run.grad_accum}, {run.hp}")
        for line in plan:
            log(line)
        yield log
    finally:
        if run.world_size > 1:
            dist.destroy_process_group()


def graph_key(stage):
    """Stages of equal shapes share a compiled training graph (stage 3 and the extension do)."""
    return stage.batch_tokens, stage.max_seq_len, len(stage.mtp_start)


def run_training_graph(compiled, batch, stage, mtp):
    """The summed training loss of a micro-batch; mtp: the step's weights on the GPU."""
    return compiled(batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram_hash, stage.max_seq_len,
                    window_tensor(stage.windows), mtp)


def accumulate_micro_batch(compiled, batch, stage, mtp, step_loss):
    """Forward and backward of one micro-batch: gradients added into .grad, the scaled loss into step_loss."""
    loss = run_training_graph(compiled, batch, stage, mtp)
    (loss * LOSS_SCALE).backward()
    step_loss += loss.detach() * LOSS_SCALE


def run_eval_graph(compiled, batch, windows):
    return compiled(batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram_hash, VAL_LOCAL_TOKENS,
                    window_tensor(windows))


def build_model(hp, device):
    """The model and its compiled form. Compile workers build theirs here too: the same options give
    the same graphs, and so the cache entries the main process looks for."""
    model = GPT(device=device, attention=hp.attention)
    return model, functools.partial(model, trunk=torch.compile(model.trunk, **COMPILE_OPTIONS))


class Trainer:
    """The model, its compiled form and its optimizer, and the mechanics of a step: its micro-batches,
    forward and backward (replaying the CUDA graphs once captured), the optimizer; and validation."""

    def __init__(self, run):
        self.run, self.schedule = run, run.schedule
        torch.manual_seed(run.hp.seed)
        self.model, self.compiled = build_model(run.hp, run.device)
        if run.world_size > 1:
            for p in self.model.parameters():
                dist.broadcast(p.detach(), 0)
        self.optimizer = self.new_optimizer(run.rank, run.world_size, sparse_bigram=run.sparse_bigram)
        self.step_loss = torch.zeros((), device=run.device)  # the step's loss, accumulated on the GPU
        # each stage's MTP weights, a row per step, on the GPU once: no copy from the host per step
        self.mtp_tables = {self.schedule.stage_index(first): torch.tensor(
            [self.schedule.mtp_weights(step) for step in range(first, end)], dtype=torch.float32, device=run.device)
            for _, first, end in self.schedule.stage_ranges()}
        self.graphs = None  # MicroBatchGraphs, captured after the warm-up (--cuda_graphs)

    def new_optimizer(self, rank, world_size, **options):
        hp = self.run.hp
        return NorMuonAdam(self.model, rank, world_size, adam_lr=hp.adam_lr, adam_eps=hp.adam_eps,
                           adam_weight_decay=hp.adam_weight_decay, muon_lr=hp.muon_lr, muon_beta2=hp.muon_beta2,
                           muon_weight_decay=hp.muon_weight_decay, **options)

    def state(self):
        """A copy of the parameters and the optimizer's state, for restore."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}, self.optimizer.state_dict()

    def restore(self, state):
        """Back to state(): parameters, optimizer and rotary; gradients zeroed in place (CUDA graphs
        accumulate into these tensors)."""
        parameters, optimizer = state
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(parameters[n])
                p.grad.zero_()
        self.optimizer.load_state_dict(optimizer)
        self.model.rotary.reset()

    def mtp_weights(self, step):
        stage = self.schedule.stage_index(step)
        return self.mtp_tables[stage][step - self.schedule.starts[stage]]

    def loader(self, first_step=0):
        """Training micro-batches from the first shard on, at the shapes of first_step's stage."""
        return self.run.train_batches(self.schedule.stage(first_step))

    def first_micro_batch(self, first_step):
        """This rank's first micro-batch at first_step's shapes, from the first shard."""
        loader = self.loader(first_step)
        batch = next(loader)
        loader.close()
        return batch

    def micro_batches(self, loader, step):
        """The step's micro-batches; the first one tells the loader about a new stage."""
        stage = self.schedule.stage(step)
        new_stage = step > 0 and self.schedule.stage(step - 1) != stage
        first = loader.send((stage.batch_tokens, stage.max_seq_len, self.run.grad_accum)) if new_stage else next(loader)
        return [first] + [next(loader) for _ in range(self.run.grad_accum - 1)]

    def accumulate_gradients(self, step, batches, use_graphs=True):
        """Forward and backward over the step's micro-batches: gradients into .grad, the loss into step_loss;
        through the captured CUDA graphs if there are any (and use_graphs)."""
        stage = self.schedule.stage(step)
        self.step_loss.zero_()
        for batch in batches:
            if self.graphs is None or not use_graphs:
                accumulate_micro_batch(self.compiled, batch, stage, self.mtp_weights(step).clone(), self.step_loss)
            else:
                self.graphs.replay(stage, self.model.rotary.attn_scale, batch, self.mtp_weights(step))

    def optimizer_step(self, step, optimizer):
        with torch.profiler.record_function("optimizer"):  # profile_gpt.py's optimizer row
            optimizer.step(self.schedule.lr_multiplier(step), self.schedule.momentum(step),
                           self.schedule.adam_step(step))

    def train_step(self, step, batches):
        """Forward and backward over the step's micro-batches, then the optimizer. Nothing waits for the GPU."""
        self.optimizer.before_forward([batch.bigram_rows for batch in batches], self.schedule.adam_step(step))
        self.accumulate_gradients(step, batches)
        self.optimizer_step(step, self.optimizer)
        if step == self.schedule.split_step:
            self.optimizer.untie()

    def apply_yarn(self, step):
        """Stretch the rotary frequencies when the long window grows at this step."""
        if step > 0:
            old, new = self.schedule.stage(step - 1).windows[1], self.schedule.stage(step).windows[1]
            if new != old:
                self.model.rotary.yarn(WINDOW_BLOCK * old, WINDOW_BLOCK * new)

    def set_rotary(self, step):
        """The rotary tables and attention scale as training has them at step."""
        self.model.rotary.reset()
        for s in range(1, step + 1):
            self.apply_yarn(s)

    @torch.no_grad()
    def validate(self, windows, val_batches=None):
        """Mean loss over the validation tokens (or over the given batches), averaged over ranks."""
        if val_batches is None:
            val_batches = self.run.val_batches(self.run.hp.val_tokens)
        total, count = torch.zeros((), device=self.run.device), 0
        for batch in val_batches:
            total += run_eval_graph(self.compiled, batch, windows)
            count += 1
        if self.run.world_size > 1:
            dist.all_reduce(total)
        return total.item() / (count * self.run.world_size)


def compile_graph(run, stage):
    """Compile the model graph of one stage (None: the evaluation graph) by running it once on a real
    batch, as the main process's warm-up will. Inductor, Triton and FA4 keep what they compile in
    on-disk caches, where the main process finds it. Returns (seconds, GPU peak in GiB)."""
    t0 = time.perf_counter()
    torch.cuda.set_device(run.device)
    _, compiled = build_model(run.hp, run.device)
    if stage is None:
        batches = run.val_batches(VAL_BATCH_TOKENS)
        with torch.no_grad():
            run_eval_graph(compiled, next(batches), FINAL_VAL_WINDOWS)
    else:
        batches = run.train_batches(stage)
        mtp = torch.tensor(stage.mtp_start, dtype=torch.float32, device=run.device)
        (run_training_graph(compiled, next(batches), stage, mtp) * LOSS_SCALE).backward()
    batches.close()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def compile_worker(sender, threads, *args):
    """Process entry: compile_graph(*args) with this many Triton compile threads; sends its result
    or its error as one line."""
    try:
        configure_torch()
        torch._inductor.config.compile_threads = threads
        sender.send(compile_graph(*args))
    except Exception as e:  # the main process logs it and compiles the graph itself
        first_line = (str(e).strip().splitlines() or [""])[0]
        sender.send(f"{type(e).__name__}: {first_line}")


class CompileWorker:
    """A process compiling one graph ahead of the main process's warm-up."""

    def __init__(self, context, name, threads, *args):
        self.name = name
        self.receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=compile_worker, args=(sender, threads, *args))
        self.process.start()
        sender.close()

    def result(self, timeout=900):
        """(seconds, GPU peak GiB), or what went wrong as one line. A worker silent for timeout seconds
        (a cold compile takes one or two minutes) is stopped: the main process compiles its graph."""
        if not self.receiver.poll(timeout):
            self.stop()
            return f"no result after {timeout} s"
        try:
            return self.receiver.recv()
        except EOFError:
            self.process.join()
            return f"the process exited with code {self.process.exitcode}"
        finally:
            self.process.join()

    def stop(self):
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start_compile_workers(run):
    """One worker process per graph after the main process's first (stage 1's training graph),
    on this rank's GPU, sharing the machine's CPUs with the other ranks' workers."""
    stages = {}
    for _, first, _ in run.schedule.stage_ranges():
        stages.setdefault(graph_key(run.schedule.stage(first)), run.schedule.stage(first))
    jobs = [(key, stage) for key, stage in list(stages.items())[1:]] + [("eval", None)]
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", run.world_size)) * (len(jobs) + 1)
    threads = max(1, (os.cpu_count() or 1) // processes)
    context = multiprocessing.get_context("spawn")
    return {key: CompileWorker(context, "the evaluation graph" if stage is None else
                               f"the training graph of {stage.batch_tokens:,} tokens/step", threads, run, stage)
            for key, stage in jobs}


def await_worker(workers, key, log):
    """Wait for the worker compiling this graph, if one does: the main process then loads it from the cache."""
    if key in workers:
        worker = workers.pop(key)
        result = worker.result()
        if isinstance(result, str):
            log(f"warm-up: the worker compiling {worker.name} failed ({result}); compiling it here")
        else:
            log(f"warm-up: a worker compiled {worker.name} in {result[0]:.1f}s (GPU peak {result[1]:.1f} GiB)")


def warm_cache_marker(attention, world_size):
    """A file in Inductor's cache folder named by what the compiled graphs depend on (this script, the
    name it runs under, the libraries, the GPU, the attention backend, the world size), written after a
    warm-up. Where it exists the caches hold this run's graphs, and compile workers would only slow the
    start. The name: a graph traced from __main__ (python train_gpt.py) and one traced from the module
    train_gpt (profile_gpt.py) have different cache keys."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    with open(__file__, "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(f"{__name__} {torch.__version__} {triton.__version__} {torch.cuda.get_device_name()} "
               f"{describe_attention_backend(attention)} {world_size}".encode())
    return os.path.join(cache_dir(), f"speedrun_warm_{key.hexdigest()[:16]}")


HEARTBEAT_SECONDS = 15  # a cold compile runs a minute or more without a line


@contextlib.contextmanager
def heartbeat(log, what, launch_time, every=HEARTBEAT_SECONDS):
    """Log a line every `every` seconds while the body runs, so a long compile shows it is alive."""
    done = threading.Event()

    def beat():
        while not done.wait(every):
            try:
                log(f"{what}: still running, {time.perf_counter() - launch_time:.0f}s since launch")
            except UsageError:  # the log cannot be written: the main thread's next line says so
                return
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def seconds_timer():
    """warm_up's default timer: from now, a function that gives the seconds since (profile_gpt.py's
    also splits them by compiler stage)."""
    t0 = time.perf_counter()
    return lambda: f"{time.perf_counter() - t0:.1f}s"


def warm_up(trainer, log, launch_time, timer=seconds_timer):
    """Compile every graph on real batches (a training step and an eval forward at each warm-up step),
    then restore the initial model, optimizer and rotary: warm-up trains nothing. Meanwhile worker
    processes compile the later graphs (--parallel_compile). Then the CUDA graphs are captured. timer:
    what each step's line says of its time (seconds_timer)."""
    run, schedule = trainer.run, trainer.schedule
    log(f"attention: {describe_attention_backend(trainer.model.attention_backend)}")
    log(f"linear+ReLU² and attention projections: {describe_gemm_kernels()}")
    initial = trainer.state()
    marker = warm_cache_marker(trainer.model.attention_backend, run.world_size)
    warm = os.path.exists(marker)
    parallel = {"on": True, "off": False, "auto": not warm}[run.hp.parallel_compile]
    log(f"warm-up: {'compile workers' if parallel else 'no compile workers'} (--parallel_compile "
        f"{run.hp.parallel_compile}; {'warm' if warm else 'cold'} caches)")
    workers = start_compile_workers(run) if parallel else {}
    loader = trainer.loader()
    try:
        val_batch = [next(run.val_batches(VAL_BATCH_TOKENS))]
        steps = schedule.warm_up_steps()
        for k, step in enumerate(steps, 1):
            stage = schedule.stage(step)
            what = f"warm-up step {k} of {len(steps)} (step {step}, {stage.name})"
            log(f"{what}: {time.perf_counter() - launch_time:.0f}s since launch")
            step_time = timer()
            with heartbeat(log, what, launch_time):
                trainer.apply_yarn(step)
                await_worker(workers, graph_key(stage), log)
                trainer.train_step(step, trainer.micro_batches(loader, step))
                await_worker(workers, "eval", log)
                trainer.validate(stage.windows, val_batch)
                torch.cuda.synchronize()
            log(f"{what} done in {step_time()}")
    finally:
        loader.close()
        for worker in workers.values():
            worker.stop()
    open(marker, "w").close()
    trainer.restore(initial)
    if run.hp.cuda_graphs:
        trainer.graphs = capture_graphs(trainer, log)
    log(f"compilation and warm-up: {time.perf_counter() - launch_time:.0f}s from launch")
    log("Resetting Model")


class MicroBatchGraphs:
    """accumulate_micro_batch as one CUDA graph per stage: the host launches one graph instead of ~700
    kernels. A graph bakes in what the host passed at capture: the stage's shapes and windows and the
    attention scale (YaRN's, a CPU tensor), so each (stage, scale) gets its own capture; the batch and
    the MTP weights are copied into the graph's input buffers. A replay adds into the .grad tensors
    present at capture, so those must never be replaced (the optimizer zeroes them in place). All
    graphs share one memory pool: they never run at the same time."""

    def __init__(self, compiled, step_loss):
        self.compiled, self.step_loss = compiled, step_loss
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self.graphs = {}

    @staticmethod
    def key(stage, attn_scale):
        return graph_key(stage), stage.windows, float(attn_scale)

    def prime(self, stage, batch, mtp):
        """Run a micro-batch eagerly on the capture stream before capturing: lazy initialisations for that stream.
        It adds its gradients and loss: zero them after. Run every stage's before the first capture."""
        torch.cuda.synchronize()
        with torch.cuda.stream(self.stream):
            accumulate_micro_batch(self.compiled, batch, stage, mtp.clone(), self.step_loss)
        torch.cuda.synchronize()

    def capture(self, stage, attn_scale, batch, mtp):
        """Capture stage's micro-batch; the host values it reads (windows, attn_scale) are the current ones."""
        inputs = MicroBatch(*(t.clone() for t in batch[:4]), batch.bigram_rows)
        mtp = mtp.clone()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the NCCL watchdog, data loading) may keep using CUDA meanwhile
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            accumulate_micro_batch(self.compiled, inputs, stage, mtp, self.step_loss)
        self.graphs[self.key(stage, attn_scale)] = graph, inputs, mtp

    def replay(self, stage, attn_scale, batch, mtp):
        graph, inputs, static_mtp = self.graphs[self.key(stage, attn_scale)]
        for static, new in zip(inputs[:4], batch[:4]):
            static.copy_(new, non_blocking=True)
        static_mtp.copy_(mtp, non_blocking=True)
        graph.replay()


def capture_graphs(trainer, log):
    """One CUDA graph per stage, largest first (the smaller ones reuse its memory), each with the
    attention scale of its stage; then gradients and loss are zeroed and the rotary reset."""
    t0 = time.perf_counter()
    model, schedule = trainer.model, trainer.schedule
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    graphs = MicroBatchGraphs(trainer.compiled, trainer.step_loss)
    firsts = [first for _, first, _ in reversed(schedule.stage_ranges())]
    batches = [trainer.first_micro_batch(first) for first in firsts]
    # emptied before and after the warm-up runs: the caching allocator keeps blocks per stream, so
    # the warm-up steps' cache, these runs' cache and the graphs' pool would otherwise add up
    torch.cuda.empty_cache()
    for first, batch in zip(firsts, batches):
        graphs.prime(schedule.stage(first), batch, trainer.mtp_weights(first))
    torch.cuda.empty_cache()
    for first, batch in zip(firsts, batches):
        trainer.set_rotary(first)
        graphs.capture(schedule.stage(first), model.rotary.attn_scale, batch, trainer.mtp_weights(first))
    model.rotary.reset()
    torch._foreach_zero_([p.grad for p in model.parameters()] + [trainer.step_loss])
    torch.cuda.synchronize()
    log(f"CUDA graphs: {len(graphs.graphs)} captured in {time.perf_counter() - t0:.1f}s "
        f"(GPU memory reserved: {torch.cuda.memory_reserved() / 2**30:.1f} GiB)")
    return graphs


LAUNCH_AHEAD_STEPS = 2  # the host launches at most this many steps beyond the last one the GPU finished


class TrainingClock:
    """The training clock, as the record's: it runs from the start of the first step, whose batches (the
    first shard's load with them) are drawn on it, to the end of the last, and stops only to validate.
    It takes no synchronization per step: the host runs up to LAUNCH_AHEAD_STEPS ahead of the GPU; each
    step's end is a CUDA event and its loss is copied to pinned memory, both read once the GPU has passed
    them: then the step is logged with its time on the clock, and a non-finite loss stops the run."""

    def __init__(self, schedule, loss_divisors, log, advice):
        """loss_divisors: per step, what turns the step's loss (this rank's, as the loop sums it) into a
        mean per token."""
        self.total_steps, self.loss_divisors, self.log, self.advice = schedule.total, loss_divisors, log, advice
        self.stage_firsts = [schedule.starts[schedule.stage_index(step)] for step in range(schedule.total)]
        # tokens of the steps before each step, for the time left
        self.tokens_before = [0, *itertools.accumulate(schedule.stage(step).batch_tokens
                                                       for step in range(schedule.total))]
        self.seconds = 0.0  # on the clock, up to the last stop
        self.step_ends = [math.nan] * self.total_steps  # seconds on the clock at each step's end
        self.losses = torch.zeros(self.total_steps, dtype=torch.float32).pin_memory()
        self.pending = collections.deque()  # (step, its end event): launched, not yet logged
        self.running = None  # (host clock, start event) since the last start

    def start(self):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self.running = time.perf_counter(), start

    def launched(self, step, step_loss):
        self.losses[step].copy_(step_loss, non_blocking=True)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((step, end))

    def keep_up(self):
        """Wait until the GPU is at most LAUNCH_AHEAD_STEPS behind; log the steps it has finished."""
        while self.pending and (len(self.pending) > LAUNCH_AHEAD_STEPS or self.pending[0][1].query()):
            self._retire()

    def stop(self):
        torch.cuda.synchronize()
        seconds = time.perf_counter() - self.running[0]
        while self.pending:
            self._retire()
        self.seconds += seconds
        self.running = None

    def stage_ms(self, first, end):
        """Mean ms per step on the clock over steps first .. end - 1."""
        return 1000 * (self.step_ends[end - 1] - seconds_before(self.step_ends, first)) / (end - first)

    def _retire(self):
        step, end = self.pending.popleft()
        end.synchronize()
        loss = self.losses[step].item()
        if not math.isfinite(loss):
            raise TrainingError(f"the training loss is {loss} at step {step}: stopping. {self.advice}")
        self.step_ends[step] = self.seconds + self.running[1].elapsed_time(end) / 1000
        self.log(f"step:{step + 1}/{self.total_steps} train_time:{1000 * self.step_ends[step]:.0f}ms "
                 f"step_avg:{1000 * self.step_ends[step] / (step + 1):.2f}ms "
                 f"train_loss:{loss / self.loss_divisors[step]:.4f} "
                 f"time_left:{seconds_left(self.step_ends, self.tokens_before, self.stage_firsts[step], step):.0f}s")


def seconds_before(step_ends, step):
    """Seconds on the clock when step began: the end of the step before it (0 for the first)."""
    return step_ends[step - 1] if step else 0.0


def seconds_left(step_ends, tokens_before, stage_first, step):
    """Training time after step, at the rate per token of its stage so far (later stages take more
    tokens per step); validations not included. step_ends: seconds on the clock at each step's end;
    tokens_before: the tokens of the steps before each step, and of all at the end."""
    seconds = step_ends[step] - seconds_before(step_ends, stage_first)
    rate = seconds / (tokens_before[step + 1] - tokens_before[stage_first])
    return rate * (tokens_before[-1] - tokens_before[step + 1])


def timed_loop(schedule, val_loss_every, clock, draw_batches, launch_step, validate, log):
    """Every step of the schedule on the clock; every val_loss_every steps (0: never) and at the end the
    clock stops for a validation. draw_batches(step): the step's micro-batches, drawn on the clock;
    launch_step(step, batches): launches the step, returns its loss on the GPU; validate(windows): the
    validation loss. Returns the final validation loss."""
    total, batches = schedule.total, None
    for step in range(total + 1):
        last = step == total
        if last or (val_loss_every and step % val_loss_every == 0):
            if clock.running:
                clock.stop()
            val_loss = validate(FINAL_VAL_WINDOWS if last else schedule.stage(step).windows)
            log(f"step:{step}/{total} val_loss:{val_loss:.4f} train_time:{1000 * clock.seconds:.0f}ms "
                f"step_avg:{1000 * clock.seconds / max(step, 1):.2f}ms")
        if last:
            return val_loss
        if not clock.running:
            clock.start()
        if batches is None:  # step 0's: the first shard's load is on the clock, as in the record
            batches = draw_batches(step)
        clock.launched(step, launch_step(step, batches))
        if step + 1 < total:  # the host draws the next step's batches while the GPU computes
            batches = draw_batches(step + 1)
        clock.keep_up()


def save_whole(state, path):
    """torch.save into a temporary name, renamed once whole: a failed save leaves nothing behind."""
    partial = f"{path}.partial"
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as its stream's RuntimeError
        if os.path.exists(partial):
            os.remove(partial)
        reason = e.strerror if isinstance(e, OSError) else "the write failed"
        raise UsageError(f"cannot save {path} ({reason}): free space on its disk") from None


def train(trainer, log, launch_time):
    """The schedule on the clock, then the summary and the checkpoint (--save_checkpoint)."""
    run, schedule = trainer.run, trainer.schedule
    loader = trainer.loader()
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    # step_loss is LOSS_SCALE times the sum of this rank's micro-batches' losses, each the sum over its
    # tokens of the multi-token losses: per token, the MTP weights' weighted mean of the losses
    loss_divisors = [LOSS_SCALE * run.grad_accum * schedule.stage(step).batch_tokens / SLOTS_PER_STEP
                     * sum(schedule.mtp_weights(step)) for step in range(schedule.total)]
    clock = TrainingClock(schedule, loss_divisors, log, f"Lower the learning rates (--adam_lr {run.hp.adam_lr}, "
                                                        f"--muon_lr {run.hp.muon_lr}) or check the data.")

    def launch_step(step, batches):
        trainer.apply_yarn(step)
        trainer.train_step(step, batches)
        return trainer.step_loss
    val_loss = timed_loop(schedule, run.hp.val_loss_every, clock, functools.partial(trainer.micro_batches, loader),
                          launch_step, trainer.validate, log)
    loader.close()
    if counters["stats"]["unique_graphs"] > graphs_after_warm_up:
        log(f"warning: {counters['stats']['unique_graphs'] - graphs_after_warm_up} graph(s) compiled after the "
            "warm-up: the step times include their compilation (Schedule.warm_up_steps misses a path)")
    summarize(log, run, clock, val_loss, time.perf_counter() - launch_time)
    if run.hp.save_checkpoint:
        path = checkpoint_path(run.hp.run_id, run.rank)
        save_whole({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}, path)
        log(f"saved {path} (and one per rank)")


RECORD_74_STAGE_MS = (32.5, 58.7, 85.3, 85.8)  # its published log's stages 1, 2, 3 and extension, on 8xH100
TARGET_VAL_LOSS = 3.28  # on FineWeb's validation tokens


def target_verdict(val_loss, val_file):
    """Whether the final validation loss reached the record's target; no target on synthetic data."""
    if is_synthetic(val_file):
        return "synthetic data: no target"
    return f"the {TARGET_VAL_LOSS} target {'reached' if val_loss <= TARGET_VAL_LOSS else 'NOT reached'}"


def summarize(log, run, clock, val_loss, wall_seconds):
    """The run's last lines: what a speedrunner reads first."""
    log("summary:")
    log(f"  final val loss {val_loss:.4f} ({target_verdict(val_loss, run.val_files[0])})")
    log(f"  train time {clock.seconds:.1f} s on the clock; {wall_seconds:.0f} s from launch, warm-up included")
    log(f"  {'stage':<11}{'steps':>11}{'ms/step':>10}  record #74 on 8xH100, ms/step")
    for (name, first, end), record_ms in zip(run.schedule.stage_ranges(), RECORD_74_STAGE_MS):
        log(f"  {name:<11}{f'{first}-{end - 1}':>11}{clock.stage_ms(first, end):>10.1f}  {record_ms}")
    log(f"  peak memory {torch.cuda.max_memory_allocated() // 2**20:,} MiB allocated, "
        f"{torch.cuda.max_memory_reserved() // 2**20:,} MiB reserved")


def main(argv=None):
    launch_time = time.perf_counter()
    prepared = prepare(*parse_args(sys.argv[1:] if argv is None else argv))
    if prepared is None:
        return
    run, plan = prepared
    with session(run, plan) as log:
        trainer = Trainer(run)
        warm_up(trainer, log, launch_time)
        train(trainer, log, launch_time)


def print_lines(lines):
    if sys.stdout is None:  # started with it closed: print() would write nothing and say nothing
        raise UsageError("the standard output is closed: --check prints the plan there; give it a file or a pipe")
    try:
        print("\n".join(lines), flush=True)
    except OSError as e:  # a full disk, a closed pipe: say so in one line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the flush at exit cannot fail
        raise UsageError(f"cannot write to the standard output ({e.strerror})") from None


def is_secondary_rank():
    """Under torchrun, ranks above 0 fail exactly as rank 0 does: only rank 0 prints the message. A
    process started alone with RANK > 0 has no rank 0 to speak for it."""
    rank = os.environ.get("RANK", "0").strip()
    return "TORCHELASTIC_RUN_ID" in os.environ and re.fullmatch(r"[0-9]+", rank) is not None and int(rank) > 0


def command_line(main=main):
    """main, with every error a user can cause as one line on stderr."""
    try:
        main()
    except (UsageError, DataError, TrainingError) as e:
        if not is_secondary_rank():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if not is_secondary_rank():
            print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    command_line()
