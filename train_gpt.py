"""Single-file GPT speedrun: train a GPT-2-small-class model on FineWeb to <= 3.28 val loss.

Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py
Sections, in order: data, kernels, model, optimizer, schedule, main. Importing this file runs
nothing, so tests can import its pieces.
"""
import concurrent.futures
import glob
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Data
#
# Shards: 256 int32 header words (magic, version, token count, ...) then uint16 tokens. Every
# document begins with BOS. Training batches are BOS-aligned and drawn identically for every
# world size: a step is 8 slots of L + 1 tokens (L = batch / 8); slot j goes to micro-step
# j // world_size on rank j % world_size.

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_WORDS
BOS_ID = 50256
VOCAB_SIZE = 50304  # 50257 padded to a multiple of 128
BIGRAM_VOCAB_SIZE = 5 * VOCAB_SIZE
SLOTS_PER_STEP = 8  # world_size * grad_accum_steps, for every world size
SYNC_BOS_INDEX_TOKENS = 6_000_000  # a fresh shard's BOS index covers this much at once, the rest in the background
FETCH_HINT = ("fetch FineWeb with `python data/cached_fineweb10B.py 9`, or make synthetic shards with "
              "`python data/synthetic.py` and pass --train_files / --val_files")


class DataError(Exception):
    """A problem with the token data that the user must fix; the message says what to do."""


def shard_problem(path):
    """None if path is a well-formed shard, else a sentence saying what is wrong with it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if header.size < HEADER_WORDS or header[0] != SHARD_MAGIC:
        return f"is not a token shard (magic {header[0] if header.size else 'missing'}, expected {SHARD_MAGIC})"
    if header[1] != SHARD_VERSION:
        return f"has shard version {header[1]}, expected {SHARD_VERSION}"
    expected = HEADER_BYTES + 2 * int(header[2])
    if size != expected:
        return f"has {size} bytes but its header promises {header[2]} tokens ({expected} bytes): truncated or corrupt"
    return None


def load_shard(path):
    """All tokens of a shard as a uint16 tensor, in pinned memory when a GPU is there."""
    problem = shard_problem(path)
    if problem:
        raise DataError(f"{path} {problem}. Delete it and fetch or generate it again.")
    num_tokens = (os.path.getsize(path) - HEADER_BYTES) // 2
    tokens = torch.empty(num_tokens, dtype=torch.uint16, pin_memory=torch.cuda.is_available())
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        f.readinto(tokens.numpy())
    return tokens


def shard_files(pattern):
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"No files match {pattern!r}: {FETCH_HINT}.")
    return files


def max_num_docs(local_tokens):
    """Fixed length of cu_seqlens: L // 300 rounded up to a multiple of 128 (static shapes for compile)."""
    return 128 * max(1, -(-(local_tokens // 300) // 128))


def bigram_hash(x):
    """h[0] = B - 1; h[i] = (36313 x[i] XOR 27191 p[i-1]) mod (B - 1) with p = x, p[0] = B - 1, int32
    wrap-around products and a floor modulo (B = bigram vocab). x: int32 numpy array."""
    prev = x[:-1].copy()
    if prev.size:
        prev[0] = BIGRAM_VOCAB_SIZE - 1
    h = np.empty_like(x)
    h[0] = BIGRAM_VOCAB_SIZE - 1
    mixed = np.bitwise_xor(x[1:] * np.int32(36313), prev * np.int32(27191))
    h[1:] = np.mod(mixed, BIGRAM_VOCAB_SIZE - 1)
    return h


def micro_batch(buf, doc_starts, device, path):
    """Tensors for one rank's micro-step from L + 1 tokens buf (int32) whose documents start at
    doc_starts: inputs int32, targets int64, cu_seqlens int32 (padded with L), bigram hashes int32."""
    local_tokens = buf.size - 1
    cu_seqlens = np.full(max_num_docs(local_tokens), local_tokens, dtype=np.int32)
    if len(doc_starts) + 1 > cu_seqlens.size:
        raise DataError(f"{path}: a micro-batch of {local_tokens} tokens holds {len(doc_starts)} documents, more than "
                        f"the {cu_seqlens.size - 1} that max_num_docs allows. Shards with such short documents "
                        "need a larger max_num_docs.")
    cu_seqlens[:len(doc_starts)] = doc_starts
    inputs = buf[:-1]
    host = (torch.from_numpy(inputs), torch.from_numpy(buf[1:].astype(np.int64)), torch.from_numpy(cu_seqlens),
            torch.from_numpy(bigram_hash(inputs)))
    if torch.device(device).type == "cuda":
        host = [t.pin_memory() for t in host]
    return tuple(t.to(device, non_blocking=True) for t in host)


class ShardReader:
    """Walks the training shards in order; loads the next shard and BOS-indexes the current one in
    background threads."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.files = shard_files(pattern)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.next_index = 0
        self.next_load = self.pool.submit(load_shard, self.files[0])
        self.advance()

    def advance(self):
        """Switch to the next shard (already loading) and start loading the one after it."""
        if self.next_load is None:
            raise DataError(f"Ran out of training data after {self.path}: the schedule needs more tokens than "
                            f"{self.pattern!r} holds ({len(self.files)} shards). Add shards: {FETCH_HINT}.")
        self.path = self.files[self.next_index]
        self.tokens = self.next_load.result()
        self.array = self.tokens.numpy()
        self.next_index += 1
        self.next_load = (self.pool.submit(load_shard, self.files[self.next_index])
                          if self.next_index < len(self.files) else None)
        self.bos = np.flatnonzero(self.array[:SYNC_BOS_INDEX_TOKENS] == BOS_ID)
        self.bos_complete = self.array.size <= SYNC_BOS_INDEX_TOKENS
        self.full_bos = None if self.bos_complete else self.pool.submit(np.flatnonzero, self.array == BOS_ID)

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
                               device="cuda"):
    """Yields (inputs, targets, cu_seqlens, bigram_hash) for each micro-step of this rank.

    send((batch_tokens, max_seq_len, grad_accum_steps)) after the last micro-step of a step switches
    the next steps to a new stage and returns that step's first micro-batch.
    """
    shard = ShardReader(pattern)
    cursor = 0
    while True:
        if world_size * grad_accum_steps != SLOTS_PER_STEP or batch_tokens % SLOTS_PER_STEP:
            raise ValueError(f"world_size * grad_accum_steps must be {SLOTS_PER_STEP} and the batch a multiple of it")
        local_tokens = batch_tokens // SLOTS_PER_STEP
        plan = plan_step(shard, cursor, local_tokens, max_seq_len)
        while plan is None:  # a step never spans two shards: drop the old shard's tail
            shard.advance()
            plan = plan_step(shard, 0, local_tokens, max_seq_len)
        slots, cursor = plan
        for micro_step in range(grad_accum_steps):
            segments = slots[micro_step * world_size + rank]
            buf = np.concatenate([shard.array[a:b] for a, b in segments]).astype(np.int32)
            doc_starts = np.cumsum([0] + [b - a for a, b in segments[:-1]])
            new_stage = yield micro_batch(buf, doc_starts, device, shard.path)
            if new_stage is not None:
                if micro_step != grad_accum_steps - 1:
                    raise ValueError("a new stage can only be sent after the last micro-step of a step")
                batch_tokens, max_seq_len, grad_accum_steps = new_stage


def validation_batches(pattern, val_tokens, local_tokens, grad_accum_steps, rank=0, world_size=1, device="cuda"):
    """Yields (inputs, targets, cu_seqlens, bigram_hash) of contiguous validation windows (not
    BOS-aligned): slot j of each val step takes local_tokens + 1 tokens at j * local_tokens;
    documents start at the BOS tokens of the inputs."""
    step_tokens = local_tokens * world_size * grad_accum_steps
    if val_tokens % step_tokens:
        raise ValueError(f"val_tokens ({val_tokens}) must be a multiple of the val step ({step_tokens} tokens)")
    files = shard_files(pattern)
    tokens = torch.cat([load_shard(f) for f in files]).numpy()
    if tokens.size < val_tokens + 1:
        raise DataError(f"{pattern!r} holds {tokens.size} tokens, fewer than the {val_tokens} + 1 that validation "
                        f"needs: lower --val_tokens, or {FETCH_HINT}.")
    for step_start in range(0, val_tokens, step_tokens):
        for micro_step in range(grad_accum_steps):
            start = step_start + (micro_step * world_size + rank) * local_tokens
            buf = tokens[start:start + local_tokens + 1].astype(np.int32)
            doc_starts = np.union1d([0], np.flatnonzero(buf[:-1] == BOS_ID))
            yield micro_batch(buf, doc_starts, device, files[0])

# ----------------------------------------------------------------------------------------------
# Kernels
#
# Every kernel takes its dtypes from the tensors it is given, so the CPU tests can drive it with
# fp32 tensors under the Triton interpreter (which has no bf16). Scalar float arguments are cast
# to fp32 inside the kernels: under torch.compile they arrive as fp64.

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


def ba_plus_cAA(a, out, alpha, beta, **config):
    """out = alpha * a @ a^T + beta * a for symmetric square a (M, M) or (B, M, M)."""
    return _launch_symmetric(_as_batched(a), _as_batched(out), alpha, beta, True, **config).view_as(out)


# Tiled transpose copy / add: each program moves one tile, read coalesced along src rows and
# written coalesced along dst rows. PyTorch's element-wise transposed copy writes uncoalesced
# and occupies every SM, which starves the optimizer's NCCL traffic of overlap.


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, M, N, stride_sm, stride_sn, stride_dn, stride_dm,
                      ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tile = tl.trans(tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=mask))
    dst = dst_ptr + cols[:, None] * stride_dn + rows[None, :] * stride_dm
    if ACCUMULATE:
        tile = tile.to(tl.float32) + tl.load(dst, mask=tl.trans(mask)).to(tl.float32)
    tl.store(dst, tile.to(dst_ptr.dtype.element_ty), mask=tl.trans(mask))


def _launch_transpose(src, dst, accumulate, block):
    m, n = src.shape
    assert dst.shape == (n, m), f"transpose of {tuple(src.shape)} does not fit into {tuple(dst.shape)}"
    _transpose_kernel[(triton.cdiv(m, block), triton.cdiv(n, block))](
        src, dst, m, n, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
        ACCUMULATE=accumulate, BLOCK=block, num_warps=4)
    return dst


def transpose_copy(src, dst, block=64):
    """dst (N, M) = src^T for src (M, N)."""
    return _launch_transpose(src, dst, False, block)


def transpose_add(src, dst, block=64):
    """dst (N, M) += src^T for src (M, N)."""
    return _launch_transpose(src, dst, True, block)


def transposed(src):
    """A contiguous copy of src^T."""
    return transpose_copy(src, src.new_empty(src.size(1), src.size(0)))


# Fused linear + ReLU^2 (MLP up-projection), a persistent matmul with a fused epilogue.
# Forward:  acc = x @ W^T;  pre = acc,  post = relu(pre)^2 (from the rounded pre).
# Backward: acc = g @ W_proj^T (same shape);  dpre = acc * 2 * relu(pre) (from the rounded acc).


@triton.jit
def _linear_relu_square_kernel(
    x_ptr, w_ptr, pre_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pn, stride_om, stride_on,
    BACKWARD: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_blocks_m = tl.cdiv(M, BLOCK_M)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_per_group = GROUP_M * num_blocks_n
    for tile in range(tl.program_id(0), num_blocks_m * num_blocks_n, NUM_PROGRAMS):
        # Grouped order: consecutive tiles share rows of x, keeping them in L2.
        first_m = (tile // blocks_per_group) * GROUP_M
        group_size = min(num_blocks_m - first_m, GROUP_M)
        block_m = first_m + (tile % blocks_per_group) % group_size
        block_n = (tile % blocks_per_group) // group_size
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + ks) < K
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k0 + ks)[None, :] * stride_xk,
                        mask=(rows[:, None] < M) & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + (k0 + ks)[None, :] * stride_wk,
                        mask=(cols[:, None] < N) & k_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        pre_ptrs = pre_ptr + rows[:, None].to(tl.int64) * stride_pm + cols[None, :] * stride_pn
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        if BACKWARD:
            pre = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptrs, (acc * 2.0 * tl.maximum(pre, 0.0)).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
            relu = tl.maximum(acc, 0.0)
            tl.store(out_ptrs, (relu * relu).to(out_ptr.dtype.element_ty), mask=mask)


def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _launch_linear_relu_square(x, w, pre, out, backward, block_m=128, block_n=256, block_k=64,
                               num_warps=8, num_stages=3, persistent=True):
    m, k = x.shape
    n = w.size(0)
    num_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    num_programs = min(num_tiles, _num_sms(x.device)) if persistent else num_tiles
    _linear_relu_square_kernel[(num_programs,)](
        x, w, pre, out, m, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        pre.stride(0), pre.stride(1), out.stride(0), out.stride(1),
        BACKWARD=backward, NUM_PROGRAMS=num_programs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def linear_relu_square(x, w, **config):
    """(pre, post) = (x @ w^T, relu(x @ w^T)^2) for x (M, K), w (N, K)."""
    pre = x.new_empty(x.size(0), w.size(0))
    post = torch.empty_like(pre)
    _launch_linear_relu_square(x, w, pre, post, False, **config)
    return pre, post


def linear_relu_square_backward(grad, w_proj, pre, **config):
    """dpre = (grad @ w_proj^T) * 2 * relu(pre) for grad (M, K), w_proj (N, K), pre (M, N)."""
    dpre = torch.empty_like(pre)
    return _launch_linear_relu_square(grad, w_proj, pre, dpre, True, **config)


class ReLUSquareMLP(torch.autograd.Function):
    """relu(x @ c_fc^T)^2 @ c_proj with c_fc, c_proj both (hidden, dim)."""

    @staticmethod
    def forward(ctx, x, c_fc, c_proj):
        pre, post = linear_relu_square(x, c_fc)
        ctx.save_for_backward(x, c_fc, c_proj, pre, post)
        return post @ c_proj

    @staticmethod
    def backward(ctx, grad):
        x, c_fc, c_proj, pre, post = ctx.saved_tensors
        dpre = linear_relu_square_backward(grad, c_proj, pre)
        return dpre @ c_fc, dpre.mT @ x, post.mT @ grad


# Softcapped multi-token cross-entropy. z = SOFTCAP * sigmoid((logit + SHIFT) / DIVISOR) lies in
# (0, SOFTCAP), so sum(exp(z)) over the vocabulary cannot overflow fp32 and needs no running max.
# Row r's loss is sum_k w_k * (logsumexp(z_r) - z_r[target[r + k]]) over k with r + k < rows.

SOFTCAP, SOFTCAP_SHIFT, SOFTCAP_DIVISOR = 23.0, 5.0, 7.5
# FP8 scales of the lm_head matmul (x / X_SCALE and W / W_SCALE are cast to e4m3) and of the
# e5m2 logit gradient (divided by grad_scale * GRAD_SCALE).
X_SCALE, W_SCALE, GRAD_SCALE = 100 / 448, 1.6 / 448, 0.75 / 448


@triton.jit
def _gate(logits, SHIFT: tl.constexpr, DIVISOR: tl.constexpr):
    """sigmoid((logits + SHIFT) / DIVISOR) with an approximate reciprocal: these kernels are bound by
    special-function throughput, and IEEE division costs several instructions per element."""
    u = (logits + SHIFT) * (1.0 / DIVISOR)
    return tl.fdiv(1.0, 1.0 + tl.exp2(u * -1.4426950408889634), ieee_rounding=False)


@triton.jit
def _softcap_ce_forward_kernel(
    logits_ptr, targets_ptr, weights_ptr, loss_ptr, lse_ptr, n_rows, n_cols, stride_row,
    SOFTCAP: tl.constexpr, SHIFT: tl.constexpr, DIVISOR: tl.constexpr,
    NUM_PREDICTIONS: tl.constexpr, PREDICTIONS_P2: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    sum_exp = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        logits = tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        z = SOFTCAP * _gate(logits, SHIFT, DIVISOR)
        sum_exp += tl.where(cols < n_cols, tl.exp(z), 0.0)
    lse = tl.log(tl.sum(sum_exp, axis=0))
    k = tl.arange(0, PREDICTIONS_P2)
    valid = (k < NUM_PREDICTIONS) & (row + k < n_rows)
    targets = tl.load(targets_ptr + row + k, mask=valid, other=0)
    weights = tl.load(weights_ptr + k, mask=valid, other=0.0).to(tl.float32)
    z_targets = SOFTCAP * _gate(tl.load(row_ptr + targets, mask=valid, other=0.0).to(tl.float32), SHIFT, DIVISOR)
    loss = tl.sum(tl.where(valid, weights * (lse - z_targets), 0.0), axis=0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _softcap_ce_backward_kernel(
    logits_ptr, targets_ptr, weights_ptr, lse_ptr, grad_loss_ptr, grad_ptr,
    n_rows, n_cols, stride_row, stride_grad_row, inv_grad_scale,
    SOFTCAP: tl.constexpr, SHIFT: tl.constexpr, DIVISOR: tl.constexpr,
    NUM_PREDICTIONS: tl.constexpr, PREDICTIONS_P2: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # d loss / d logit = grad_loss * (S * softmax(z) - sum_k w_k onehot(target_k)) * dz/dlogit with
    # S = sum_k w_k, pre-divided by the FP8 gradient scale. The softmax term is written for every
    # column; the few target columns are then rewritten with their one-hot terms.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * stride_grad_row
    k = tl.arange(0, PREDICTIONS_P2)
    valid = (k < NUM_PREDICTIONS) & (row + k < n_rows)
    targets = tl.load(targets_ptr + row + k, mask=valid, other=-1)
    weights = tl.load(weights_ptr + k, mask=valid, other=0.0).to(tl.float32)
    weight_sum = tl.sum(weights, axis=0)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * tl.cast(inv_grad_scale, tl.float32) * (SOFTCAP / DIVISOR)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        gate = _gate(tl.load(row_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32), SHIFT, DIVISOR)
        grad = (scale * weight_sum) * tl.exp(SOFTCAP * gate - lse) * gate * (1.0 - gate)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)
    tl.debug_barrier()  # the rewrites below must land after this program's stores above
    gate = _gate(tl.load(row_ptr + targets, mask=valid, other=0.0).to(tl.float32), SHIFT, DIVISOR)
    onehot = tl.sum(tl.where(targets[:, None] == targets[None, :], weights[None, :], 0.0), axis=1)
    grad = scale * (weight_sum * tl.exp(SOFTCAP * gate - lse) - onehot) * gate * (1.0 - gate)
    tl.store(grad_row_ptr + targets, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def _ce_launch_args(mtp_weights):
    n = mtp_weights.numel()
    return dict(SOFTCAP=SOFTCAP, SHIFT=SOFTCAP_SHIFT, DIVISOR=SOFTCAP_DIVISOR,
                NUM_PREDICTIONS=n, PREDICTIONS_P2=triton.next_power_of_2(n), BLOCK_V=1024, num_warps=8)


def softcap_ce_forward(logits, targets, mtp_weights):
    """Per-row MTP losses and logsumexp of the softcapped logits (both fp32)."""
    n_rows, n_cols = logits.shape
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    lse = torch.empty_like(losses)
    _softcap_ce_forward_kernel[(n_rows,)](
        logits, targets, mtp_weights, losses, lse, n_rows, n_cols, logits.stride(0), **_ce_launch_args(mtp_weights))
    return losses, lse


def softcap_ce_backward(logits, targets, mtp_weights, lse, grad_loss, grad, inv_grad_scale=1.0):
    """grad = d(sum of losses)/d logits * grad_loss * inv_grad_scale, written in grad's dtype."""
    n_rows, n_cols = logits.shape
    _softcap_ce_backward_kernel[(n_rows,)](
        logits, targets, mtp_weights, lse, grad_loss, grad, n_rows, n_cols, logits.stride(0), grad.stride(0),
        inv_grad_scale, **_ce_launch_args(mtp_weights))
    return grad


class FP8SoftcapMTPLoss(torch.autograd.Function):
    """Sum over rows of the softcapped multi-token cross-entropy of logits = x @ w, w (dim, vocab).

    The logits come from an e4m3 scaled matmul; their gradient is stored as e5m2.
    """

    @staticmethod
    def forward(ctx, x, w, targets, mtp_weights, grad_scale):
        x_scale = torch.tensor(X_SCALE, dtype=torch.float32, device=x.device)
        w_scale = torch.tensor(W_SCALE, dtype=torch.float32, device=x.device)
        x_f8 = x.div(X_SCALE).to(torch.float8_e4m3fn)
        w_f8 = w.div(W_SCALE).to(torch.float8_e4m3fn)
        logits = torch._scaled_mm(x_f8, transposed(w_f8).mT, scale_a=x_scale, scale_b=w_scale,
                                  out_dtype=torch.bfloat16, use_fast_accum=True)
        losses, lse = softcap_ce_forward(logits, targets, mtp_weights)
        ctx.save_for_backward(x_f8, w_f8, x_scale, w_scale, logits, targets, mtp_weights, lse)
        ctx.grad_scale, ctx.w_dtype = grad_scale, w.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        x_f8, w_f8, x_scale, w_scale, logits, targets, mtp_weights, lse = ctx.saved_tensors
        grad_s = ctx.grad_scale * GRAD_SCALE
        grad_f8 = torch.empty_like(logits, dtype=torch.float8_e5m2)
        softcap_ce_backward(logits, targets, mtp_weights, lse, grad_loss, grad_f8, 1.0 / grad_s)
        grad_scale = torch.tensor(grad_s, dtype=torch.float32, device=logits.device)
        grad_x = torch._scaled_mm(grad_f8, w_f8.mT, scale_a=grad_scale, scale_b=w_scale,
                                  out_dtype=torch.bfloat16, use_fast_accum=False)
        grad_w = torch._scaled_mm(transposed(x_f8), transposed(grad_f8).mT, scale_a=x_scale,
                                  scale_b=grad_scale, out_dtype=torch.float32, use_fast_accum=False)
        return grad_x, grad_w.to(ctx.w_dtype), None, None, None


# Fused Nesterov momentum + Polar Express orthogonalisation (one compiled function per shape).

POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def gram(X, out, tall):
    """out = X^T X (tall) or X X^T for a batch X, through the symmetric kernel only for the
    shapes where it measured faster than cuBLAS on an H200 (kernels_test.py --bench --sweep)."""
    use_kernel = X.size(0) >= GRAM_KERNEL_MIN_BATCH_TALL if tall else X.size(0) <= GRAM_KERNEL_MAX_BATCH_WIDE
    if use_kernel:
        return (XTX if tall else XXT)(X, out)
    return torch.bmm(X.mT, X, out=out) if tall else torch.bmm(X, X.mT, out=out)


GRAM_KERNEL_MIN_BATCH_TALL, GRAM_KERNEL_MAX_BATCH_WIDE = 6, 5


def nesterov_polar_express(grad, momentum_buffer, momentum, compute_dtype=torch.bfloat16):
    """Nesterov update of momentum_buffer (in place), then Polar Express of the Nesterov
    gradient, for a batch of matrices (B, rows, cols). Returns X in compute_dtype.

    Tall matrices (rows > cols) iterate on X^T X so that X is never transposed.
    """
    momentum_buffer.lerp_(grad, 1 - momentum)
    grad = grad.lerp_(momentum_buffer, momentum)
    X = grad.to(compute_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    size = X.size(-1) if tall else X.size(-2)
    A = X.new_empty(X.size(0), size, size)
    B = torch.empty_like(A)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        gram(X, A, tall)
        ba_plus_cAA(A, B, alpha=c, beta=b)
        if not tall:
            X = torch.baddbmm(X, B, X, beta=a)
        elif X.size(-2) > 1024:
            # A plain matmul plus an in-place add avoids the defensive copy baddbmm makes here.
            X = torch.bmm(X, B).add_(X, alpha=a)
        else:
            X = torch.baddbmm(X, X, B, beta=a)
    return X


compiled_nesterov_polar_express = torch.compile(nesterov_polar_express, dynamic=False, fullgraph=True)
