"""Checks every kernel of train_gpt.py against a plain PyTorch reference in fp32/fp64.

On a GPU: real shapes, bf16 (and FP8 where the record uses it). On CPU: the Triton interpreter
at small shapes in fp32 (its bf16 is missing or wrong), which still checks indexing, tiling,
masking and symmetry; what truly needs a GPU is skipped with the reason.

    pytest kernels_test.py              # tests
    python kernels_test.py --bench      # GPU: each kernel against the PyTorch way, median µs
    python kernels_test.py --bench --sweep   # also the configurations behind the defaults
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402
import triton  # noqa: E402

import train_gpt as tg  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
# Relative-error bound: bf16 operands on GPU; fp32 in the interpreter.
TOL = 1e-2 if GPU else 1e-5
needs_gpu = pytest.mark.skipif(not GPU,
                               reason="needs a CUDA GPU (FP8 scaled matmul / torch.compile with Triton kernels)")


def gpu_or_cpu(gpu_cases, cpu_cases):
    return gpu_cases if GPU else cpu_cases


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite or unwritten (poisoned) elements in the output"
    return ((out - ref).norm() / ref.norm()).item()


def poisoned(*shape, dtype=DTYPE):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(*shape, dtype=DTYPE, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# --- symmetric products --------------------------------------------------------------------------

SYMMETRIC_SHAPES = gpu_or_cpu(
    [(5, 768, 768), (40, 768, 768), (768, 768), (37, 1001), (3, 37, 1001), (3, 3072, 768), (24, 3072, 768)],
    [(3, 40, 72), (37, 101), (70, 20), (2, 130, 33)],
)


# The interpreter runs the default 128-row blocks too, but its small shapes then hold one block:
# 32-row blocks give it blocks to mirror.
SYMMETRIC_BLOCK = gpu_or_cpu(128, 32)


def assert_mirrored(out):
    """Each block above the diagonal is also stored, transposed, below it: the copies are equal. On
    GPU the diagonal blocks are exactly symmetric too; the interpreter's numpy dot need not be."""
    block = torch.arange(out.size(-1), device=out.device) // SYMMETRIC_BLOCK
    off_diagonal = block[:, None] != block[None, :]
    assert torch.equal(out[..., off_diagonal], out.mT[..., off_diagonal]), "mirrored blocks differ"
    assert not GPU or torch.equal(out, out.mT), "a diagonal block is not symmetric"


@pytest.mark.parametrize("shape", SYMMETRIC_SHAPES)
def test_xxt(shape):
    a = randn(*shape)
    out = poisoned(*shape[:-1], shape[-2])
    tg.XXT(a, out, block_m=SYMMETRIC_BLOCK)
    ref = a.double() @ a.double().mT
    assert rel_err(out, ref) < TOL
    assert_mirrored(out)


@pytest.mark.parametrize("shape", SYMMETRIC_SHAPES)
def test_xtx(shape):
    a = randn(*shape)
    out = poisoned(*shape[:-2], shape[-1], shape[-1])
    tg.XTX(a, out, block_m=SYMMETRIC_BLOCK)
    ref = a.double().mT @ a.double()
    assert rel_err(out, ref) < TOL
    assert_mirrored(out)


@pytest.mark.parametrize("shape", gpu_or_cpu([(5, 768, 768), (40, 768, 768), (768, 768), (37, 37)],
                                             [(3, 40, 40), (37, 37), (130, 130)]))
def test_bA_plus_cAA(shape):
    x = randn(*shape)
    a = (x.double() @ x.double().mT / shape[-1]).to(DTYPE)  # symmetric, like Polar Express's A
    b, c = torch.randn(2).tolist()
    out = poisoned(*shape)
    tg.bA_plus_cAA(a, out, b, c)
    ref = b * a.double() + c * a.double() @ a.double().mT
    assert rel_err(out, ref) < TOL


# --- transpose copy / add ------------------------------------------------------------------------

TRANSPOSE_SHAPES = gpu_or_cpu([(768, 50304), (37, 1001)], [(70, 130), (33, 65)])


TRANSPOSE_CONFIGS = [{}, dict(block_m=32, block_n=128, num_warps=8)]  # the default and a non-square tile


@pytest.mark.parametrize("config", TRANSPOSE_CONFIGS)
@pytest.mark.parametrize("shape", TRANSPOSE_SHAPES)
def test_transpose_copy(shape, config):
    src = randn(*shape)
    dst = poisoned(shape[1], shape[0])
    tg._launch_transpose(src, dst, False, **config)  # the kernel, which transpose_copy runs on CUDA
    assert torch.equal(dst, src.T)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("shape", gpu_or_cpu([(37, 1001), (49152, 50304)], [(33, 65)]))
def test_transposed_fp8(dtype, shape):
    """The FP8 loss transposes its e4m3 / e5m2 operands with the same kernel; the logit gradient of
    stage 3 (49152 x 50304) has more than 2^31 elements."""
    src = randn(*shape, dtype=dtype)
    out = tg.transposed(src) if GPU else tg._launch_transpose(src, src.new_empty(shape[::-1]), False,
                                                               **tg.FP8_TRANSPOSE_TILE)
    assert out.is_contiguous() and torch.equal(out.view(torch.uint8), src.T.view(torch.uint8))


@pytest.mark.parametrize("shape", TRANSPOSE_SHAPES)
def test_transpose_add(shape):
    src = randn(*shape)
    dst = randn(shape[1], shape[0])
    ref = (dst.float() + src.float().T).to(DTYPE)  # one rounding of the fp32 sum
    tg._launch_transpose(src, dst, True)  # the kernel, which transpose_add runs on CUDA
    assert torch.equal(dst, ref)


# --- fused linear + ReLU^2 -----------------------------------------------------------------------

MLP_SHAPES = gpu_or_cpu([(16384, 768, 3072), (49152, 768, 3072), (1000, 768, 3072)], [(100, 48, 80), (37, 40, 300)])
MLP_EDGES = gpu_or_cpu([(300, 136, 520)], [])  # partial tiles in every dimension, K not a multiple of 64
QUACK = GPU and tg.quack_epilogues() is not None
needs_quack = pytest.mark.skipif(not QUACK, reason="quack's GEMMs need a Hopper GPU and quack >= 0.6 "
                                                   "(installed with FlashAttention 4)")
KERNELS = [pytest.param(False, id="triton"), pytest.param(True, id="quack", marks=needs_quack)]


@pytest.mark.parametrize("quack", KERNELS)
@pytest.mark.parametrize("tokens,dim,hidden", MLP_SHAPES + MLP_EDGES)
def test_linear_relu_square_forward(tokens, dim, hidden, quack):
    x = randn(tokens, dim)
    w = randn(hidden, dim, scale=dim ** -0.5)
    if quack:
        post = tg.quack_linear_relu_square(x, w, poisoned(tokens, hidden))
    else:
        post = tg.triton_linear_relu_square(x, w)
    pre_ref = x.double() @ w.double().T
    assert rel_err(post, pre_ref.relu().square()) < TOL
    assert (post >= 0).all()


@pytest.mark.parametrize("quack", KERNELS)
@pytest.mark.parametrize("tokens,dim,hidden", MLP_SHAPES + MLP_EDGES)
def test_linear_relu_square_backward(tokens, dim, hidden, quack):
    grad = randn(tokens, dim)
    w_proj = randn(hidden, dim, scale=dim ** -0.5)
    post = randn(tokens, hidden).relu().square()
    dpre = poisoned(tokens, hidden)
    if quack:
        tg.quack_linear_relu_square(grad, w_proj, dpre, post)
    else:
        tg._launch_linear_relu_square(grad, w_proj, post, dpre, True)
    ref = (grad.double() @ w_proj.double().T) * 2 * post.double().sqrt()
    assert rel_err(dpre, ref) < TOL


# the attention's projections: QKV (K 768, N 2304) and O (768, 768), each way; a transposed weight or a (K, N) one
MATMUL_SHAPES = gpu_or_cpu([(49152, 768, 2304), (49152, 2304, 768), (16384, 768, 768), (300, 136, 520)],
                           [(100, 48, 80), (37, 40, 72)])


@needs_quack
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("tokens,k,n", MATMUL_SHAPES)
def test_quack_matmul(tokens, k, n, transposed):
    a = randn(tokens, k)
    b = randn(n, k, scale=k ** -0.5).mT if transposed else randn(k, n, scale=k ** -0.5)
    out = tg.quack_matmul("linear", a, b, poisoned(tokens, n))
    assert rel_err(out, a.double() @ b.double()) < TOL


@pytest.mark.parametrize("tokens,k,n", MATMUL_SHAPES[:2])
def test_matmul_autograd(tokens, k, n):
    """The model's matmul (quack's GEMM on Hopper where installed, else cuBLAS) and its gradients."""
    a = randn(tokens, k).requires_grad_()
    w = randn(n, k, scale=k ** -0.5).requires_grad_()
    out = tg.matmul(a, w.mT)
    grad = randn(tokens, n)
    out.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (a, w)]
    ref = leaves[0] @ leaves[1].mT
    ref.backward(grad.double())
    assert rel_err(out, ref) < TOL
    for got, want in zip((a, w), leaves):
        assert rel_err(got.grad, want.grad) < TOL


@pytest.mark.parametrize("tokens,dim,hidden", MLP_SHAPES[:2])
def test_relu_square_mlp_autograd(tokens, dim, hidden):
    x = randn(tokens, dim).requires_grad_()
    c_fc = randn(hidden, dim, scale=dim ** -0.5).requires_grad_()
    c_proj = randn(hidden, dim, scale=hidden ** -0.5).requires_grad_()
    out = tg.ReLUSquareMLP.apply(x, c_fc, c_proj)
    grad = randn(tokens, dim)
    out.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, c_fc, c_proj)]
    ref = (leaves[0] @ leaves[1].T).relu().square() @ leaves[2]
    ref.backward(grad.double())
    assert rel_err(out, ref) < TOL
    for got, want in zip((x, c_fc, c_proj), leaves):
        assert rel_err(got.grad, want.grad) < TOL


# --- queries, keys and values: per-head RMS norm and rotary embedding ------------------------------

QKV_SHAPES = gpu_or_cpu([(49152, 6, 128), (1000, 6, 128)], [(37, 2, 16)])  # tokens, heads, head_dim
QKV_LAYOUTS = [(False, False), (True, False), (False, True)]  # (paired, shift_keys): the model's three


def qkv_inputs(tokens, heads, head_dim, paired):
    qkv = randn(tokens, 3 * heads * head_dim, scale=3.0)
    if GPU:  # the model's tables (bf16), at the positions of a long run
        rot = tg.Rotary(head_dim, 2 * tokens + 64, DEVICE)
        tables = (rot.paired_cos, rot.paired_sin) if paired else (rot.cos, rot.sin)
    else:  # any cos and sin, an extra row beyond the tokens
        width = head_dim * (2 if paired else 1)
        tables = tuple(randn(tokens + 1, 1, width) for _ in range(2))
    return qkv, *tables


@pytest.mark.parametrize("value_embed", [False, True], ids=["", "value_embed"])
@pytest.mark.parametrize("paired,shift_keys", QKV_LAYOUTS)
@pytest.mark.parametrize("tokens,heads,head_dim", QKV_SHAPES)
def test_qkv_heads(tokens, heads, head_dim, paired, shift_keys, value_embed):
    inputs = [*qkv_inputs(tokens, heads, head_dim, paired)]
    if value_embed:  # the value embedding and its gate's logits, both learned
        inputs += [randn(tokens, heads * head_dim), randn(tokens, heads, scale=2.0)]
    leaves = [inputs[0]] + inputs[3:]
    for t in leaves:
        t.requires_grad_()
    outs = tg.QKVHeads.apply(*inputs[:3], heads, paired, shift_keys, *inputs[3:])
    grads = [randn(tokens, heads, head_dim) for _ in range(3)]
    torch.autograd.backward(outs, grads)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    refs = tg.reference_qkv_heads(leaves64[0], *(t.double() for t in inputs[1:3]), heads, paired, shift_keys,
                                  *leaves64[1:])
    torch.autograd.backward(refs, [g.double() for g in grads])
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.stride(-1) == 1
        assert rel_err(out, ref) < TOL
    v_in_place = outs[2].untyped_storage().data_ptr() == inputs[0].untyped_storage().data_ptr()
    assert outs[0].is_contiguous() and outs[1].is_contiguous() and v_in_place == (not paired and not value_embed)
    for t, t64 in zip(leaves, leaves64):
        assert rel_err(t.grad, t64.grad) < TOL


# --- embedding gradients: only the touched rows -----------------------------------------------------

# tokens, table rows, dim: a stage-3 micro-batch on the token / value tables and the bigram table
EMBED_SHAPES = gpu_or_cpu([(49152, 50304, 768), (49152, 251520, 768), (16384, 50304, 768)],
                          [(300, 50, 40), (1000, 3000, 24), (70, 7, 33)])
# the interpreter: several chunks and tails at small shapes
EMBED_CONFIG = gpu_or_cpu(dict(chunk=tg.EMBED_CHUNK, tail=tg.EMBED_TAIL), dict(chunk=16, tail=32))


def skewed_rows(tokens, rows):
    """Row indices as text has them: a few frequent rows (runs over several chunks), many rare ones.
    Row 1 takes a stretch of exactly one chunk and three tails."""
    indices = (torch.rand(tokens, device=DEVICE) ** 4 * rows).long()
    indices[:EMBED_CONFIG["chunk"] + 3 * EMBED_CONFIG["tail"]] = 1
    return indices[torch.randperm(tokens, device=DEVICE)].int()


def reference_embedding_grad(table_grad, indices, grad):
    """table_grad + the per-row sums of grad, summed in fp64 and rounded to the table's dtype first."""
    sums = torch.zeros_like(table_grad, dtype=torch.float64).index_add_(0, indices.long(), grad.double())
    return table_grad.double() + sums.to(table_grad.dtype).double()


@pytest.mark.parametrize("tokens,rows,dim", EMBED_SHAPES)
def test_add_embedding_grad(tokens, rows, dim):
    indices = skewed_rows(tokens, rows)
    grad = randn(tokens, dim)
    table_grad = randn(rows, dim)
    ref = reference_embedding_grad(table_grad, indices, grad)
    untouched = torch.ones(rows, dtype=torch.bool, device=DEVICE).index_fill_(0, indices.long(), False)
    out = tg.add_embedding_grad(grad, *torch.sort(indices), table_grad.clone(), **EMBED_CONFIG)
    assert torch.equal(out[untouched], table_grad[untouched])
    assert rel_err(out[~untouched] - table_grad[~untouched], ref[~untouched] - table_grad[~untouched]) < TOL


def test_embedding_rows_autograd():
    """Forward: the rows of each stacked table; backward: into .grad, made on the first call and
    added to after."""
    tokens, rows, dim = gpu_or_cpu((4096, 1000, 768), (100, 30, 16))
    indices = skewed_rows(tokens, rows)
    token_table = randn(rows, dim).requires_grad_()
    stacked_tables = randn(3 * rows, dim).requires_grad_()
    dense = [t.detach().double().requires_grad_() for t in (token_table, stacked_tables)]
    for _ in range(2):
        outs = tg.EmbeddingRows.apply(indices, rows, token_table, stacked_tables)
        refs = [table[indices.long()] for param in dense for table in param.split(rows)]
        assert len(outs) == 4 and all(torch.equal(o.double(), r.detach()) for o, r in zip(outs, refs))
        grads = [randn(tokens, dim) for _ in outs]
        torch.autograd.backward(outs, grads)
        torch.autograd.backward(refs, [g.double() for g in grads])
    for table, ref in zip((token_table, stacked_tables), dense):
        assert rel_err(table.grad, ref.grad) < TOL


# --- softcapped multi-token cross-entropy --------------------------------------------------------

VOCAB = 50304 if GPU else 300
CE_ROWS = 4096 if GPU else 37
MTP_WEIGHTS = [[1.0], [1.0, 0.5], [1.0, 0.5, 0.25]]


def reference_mtp_losses(logits, targets, weights):
    """train_gpt's plain PyTorch losses, in fp64."""
    weights = torch.tensor(weights, dtype=torch.float64, device=logits.device)
    return tg.reference_mtp_losses(logits.double(), targets, weights)


def random_logits_and_targets(rows, vocab, distinct_targets=None):
    """distinct_targets: draw targets from that many tokens, so neighbouring rows share targets."""
    logits = randn(rows, vocab, scale=4.0)
    targets = torch.randint(0, distinct_targets or vocab, (rows,), device=DEVICE)
    return logits, targets


@needs_gpu
def test_compiled_eval_loss_at_a_validation_micro_batch():
    """Evaluation's loss as the model computes it (plain PyTorch, Inductor-compiled, in row chunks) at a
    validation micro-batch against fp64 of the same bf16 logits: the reported number is exact to fp32."""
    x, lm_head = randn(tg.VAL_LOCAL_TOKENS, 768, scale=0.5), randn(768, VOCAB, scale=0.1)
    targets = torch.randint(0, VOCAB, (tg.VAL_LOCAL_TOKENS,), device=DEVICE)
    with torch.no_grad():
        loss = torch.compile(tg.eval_loss, fullgraph=True, dynamic=False)(x, lm_head, targets)
        one = torch.ones(1, dtype=torch.float64, device=DEVICE)
        ref = torch.cat([tg.reference_mtp_losses((x[r:r + 8192] @ lm_head).double(), targets[r:r + 8192], one)
                         for r in range(0, x.size(0), 8192)]).mean()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()


def every_bf16_logit():
    """Every finite bf16 value, in order."""
    logits = torch.arange(-2 ** 15, 2 ** 15, device=DEVICE, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return logits[torch.isfinite(logits)]


CUDA_SIGMOIDS = r"""
extern "C" __global__ void sigmoids(const unsigned short* logits, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = softcap_sigmoid(bf16_low(logits[i]));
}
"""
needs_nvrtc = pytest.mark.skipif(not GPU,
                                 reason="the training loss's kernel is CUDA C++ compiled by NVRTC: needs a GPU")


@needs_nvrtc
def test_cuda_sigmoid_error_on_every_bf16_logit():
    """The training loss's tanh.approx sigmoid (the CUDA kernel's own function) on every finite bf16
    value: the bound its comment states."""
    logits = every_bf16_logit()
    out = poisoned(logits.numel(), dtype=torch.float32)
    kernel = tg.compile_cuda_kernel(tg.SOFTCAP_CE_SOURCE + CUDA_SIGMOIDS, "sigmoids", VOCAB=VOCAB, THREADS=256,
                                    UNROLL=1, BLOCKS_PER_SM=1, **tg.SOFTCAP_DEFINES)
    kernel(grid=(triton.cdiv(logits.numel(), 256), 1, 1), block=(256, 1, 1), args=[logits, out, logits.numel()])
    ref = torch.sigmoid((logits.double() + tg.SOFTCAP_SHIFT) / tg.SOFTCAP_DIVISOR)
    assert (out.double() - ref).abs().max().item() < 4e-6  # 3.7e-6 measured on an H200


@needs_nvrtc
@pytest.mark.parametrize("weights", MTP_WEIGHTS)
@pytest.mark.parametrize("logits_kind", ["random", "random, 2 distinct targets", "every bf16 value"])
def test_softcap_ce_with_grad(weights, logits_kind):
    logits, targets = random_logits_and_targets(CE_ROWS, VOCAB, 2 if "2 distinct" in logits_kind else None)
    if logits_kind == "every bf16 value":  # the huge ones saturate the softcap
        values = every_bf16_logit()
        logits.view(-1)[:values.numel()] = values[torch.randperm(values.numel(), device=DEVICE)]
    w = torch.tensor(weights, device=DEVICE)
    multiplier = 1 / tg.GRAD_SCALE
    poison = poisoned(*logits.shape, dtype=torch.float8_e5m2)
    del poison  # freed NaNs: the caching allocator hands the op's gradient this block
    losses, grad = tg.softcap_ce_with_grad(logits, targets, w, multiplier)
    leaf = logits.detach().double().requires_grad_()
    ref = reference_mtp_losses(leaf, targets, weights)
    (ref.sum() * multiplier).backward()
    assert rel_err(losses, ref.detach()) < 1e-4
    # e5m2 keeps 2 mantissa bits: elementwise rounding of up to 1/8 relative, ~7% in norm.
    assert rel_err(grad.float(), leaf.grad) < 0.1
    assert losses[-len(weights):].abs().min() > 0


@needs_gpu
@pytest.mark.parametrize("weights", MTP_WEIGHTS)
def test_fp8_softcap_mtp_loss_autograd(weights):
    rows, dim = 16384, 768
    x = randn(rows, dim, scale=0.5).requires_grad_()
    w = randn(dim, VOCAB, scale=0.005 * 20).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows,), device=DEVICE)
    mtp = torch.tensor(weights, device=DEVICE)
    loss = tg.FP8SoftcapMTPLoss.apply(x, w, targets, mtp)
    (loss * 0.125).backward()  # as training scales it
    # Reference: the same e4m3-rounded operands, fp64 everywhere else.
    x_q = (x.detach() / tg.X_SCALE).to(torch.float8_e4m3fn).double() * tg.X_SCALE
    w_q = (w.detach() / tg.W_SCALE).to(torch.float8_e4m3fn).double() * tg.W_SCALE
    x_q.requires_grad_()
    w_q.requires_grad_()
    ref = reference_mtp_losses(x_q @ w_q, targets, weights).sum()
    (ref * 0.125).backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
    # e5m2 logit gradients (2 mantissa bits) bound the gradient accuracy.
    assert rel_err(x.grad, x_q.grad) < 0.1
    assert rel_err(w.grad, w_q.grad) < 0.1


# --- fused Nesterov + Polar Express --------------------------------------------------------------

def reference_polar_express(grad, momentum_buffer, momentum, compute_dtype, math_dtype=torch.float32):
    """Same math in plain PyTorch, wide form: X <- aX + (bA + cA^2) X with A = X X^T."""
    buf = momentum_buffer.float().lerp(grad.float(), 1 - momentum)
    g = grad.float().lerp(buf, momentum)
    X = g.to(compute_dtype).to(math_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * tg.NORM_MARGIN + tg.NORM_EPS)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    for a, b, c in tg.POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X), buf


@pytest.mark.parametrize("shape", gpu_or_cpu([(40, 768, 768), (24, 3072, 768), (5, 768, 768), (3, 3072, 768)],
                                             [(3, 40, 72), (2, 72, 40), (12, 40, 16), (1, 1030, 24)]))
def test_nesterov_polar_express(shape):
    grad = torch.randn(shape, device=DEVICE)
    buf = torch.randn(shape, device=DEVICE)
    momentum = 0.95
    ref, ref_buf = reference_polar_express(grad, buf, momentum, DTYPE)
    fn = torch.compile(tg.nesterov_polar_express, **tg.COMPILE_OPTIONS) if GPU else tg.nesterov_polar_express
    out = fn(grad, buf, torch.tensor(momentum), compute_dtype=DTYPE)
    assert out.dtype == DTYPE
    assert rel_err(buf, ref_buf) < 1e-6
    # five bf16 iterations drift further from fp32 than one bf16 product does
    assert rel_err(out, ref) < (3e-2 if GPU else 1e-4)


# --- kernels inside torch.compile ----------------------------------------------------------------

@needs_gpu
def test_kernels_inside_compile():
    rows, dim, hidden = 2048, 768, 3072

    def step(x, c_fc, c_proj, w, targets, mtp, a, src, qkv, cos, sin):
        h = tg.ReLUSquareMLP.apply(tg.matmul(x, c_fc[:dim].mT), c_fc, c_proj)
        loss = tg.FP8SoftcapMTPLoss.apply(h, w, targets, mtp)
        sym = tg.XXT(a, torch.empty(a.size(0), a.size(1), a.size(1), dtype=a.dtype, device=a.device))
        dst = tg.transpose_copy(src, torch.empty(src.size(1), src.size(0), dtype=src.dtype, device=src.device))
        return loss, sym, dst, torch.stack(tg.QKVHeads.apply(qkv, cos, sin, 6, False, True))

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x = randn(rows, dim)
    params = [randn(hidden, dim, scale=dim ** -0.5), randn(hidden, dim, scale=hidden ** -0.5),
              randn(dim, VOCAB, scale=0.1)]
    targets = torch.randint(0, VOCAB, (rows,), device=DEVICE)
    mtp = torch.tensor([1.0, 0.5], device=DEVICE)
    a, src = randn(3, 768, 768), randn(768, 4000)
    qkv, cos, sin = qkv_inputs(rows, 6, 128, paired=False)
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        leaves = [p.clone().requires_grad_() for p in params]
        loss, sym, dst, heads = fn(x, *leaves, targets, mtp, a, src, qkv, cos, sin)
        loss.backward()
        results[name] = (loss.detach(), sym, dst, heads, *[p.grad for p in leaves])
    (loss, sym, dst, heads, *grads), (c_loss, c_sym, c_dst, c_heads, *c_grads) = results["eager"], results["compiled"]
    assert rel_err(c_loss, loss) < 1e-3
    assert torch.equal(c_sym, sym) and torch.equal(c_dst, dst) and torch.equal(c_heads, heads)
    # Inductor may fuse the FP8 scaling differently, moving some e5m2 logit gradients by one
    # rounding step (2 mantissa bits), so gradients agree to the FP8 tolerance only.
    for c_grad, grad in zip(c_grads, grads):
        assert rel_err(c_grad, grad) < 0.1


def test_help_names_the_benchmarks():
    import subprocess
    out = subprocess.run([sys.executable, __file__, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--bench --sweep" in out.stdout and len(out.stdout.splitlines()) < 20


# --- benchmark: `python kernels_test.py --bench [--sweep]` on a GPU; timings, not tests ---------------

def _median_us(fn):
    from triton.testing import do_bench
    return 1000 * do_bench(fn, warmup=25, rep=200, return_mode="median")


def _bf16(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale


def _embedding_grad_inputs(rows_in_table, tokens=49152, dim=768):
    """A stage-3 micro-batch's table indices (skewed as text's), sorted as the model sorts them
    (sorted rows, order), its (tokens, dim) gradient and the table's .grad."""
    indices = skewed_rows(tokens, rows_in_table)
    return (indices, *torch.sort(indices), _bf16(tokens, dim), _bf16(rows_in_table, dim))


def _bench_rows():
    """(kernel, ours µs, PyTorch µs) for each kernel at the shapes of the record."""
    rows = []

    def add(name, ours, theirs):
        rows.append((name, _median_us(ours), _median_us(theirs)))

    src, dst = _bf16(768, 50304), _bf16(50304, 768)
    add("transpose copy 768x50304", lambda: tg.transpose_copy(src, dst), lambda: dst.copy_(src.T))
    add("transpose add 768x50304", lambda: tg.transpose_add(src, dst), lambda: dst.add_(src.T))
    for batch in (5, 40):
        a, out = _bf16(batch, 768, 768), _bf16(batch, 768, 768)
        add(f"A·Aᵀ {batch}x768x768 (gram)", lambda: tg.gram(a, out, tall=False), lambda: torch.bmm(a, a.mT, out=out))
        add(f"c·A·Aᵀ+b·A {batch}x768x768", lambda: tg.bA_plus_cAA(out, a, -1.5, 0.5),
            lambda: torch.baddbmm(out, out, out.mT, beta=-1.5, alpha=0.5, out=a))
    for batch in (3, 6, 24):
        a, out = _bf16(batch, 3072, 768), _bf16(batch, 768, 768)
        add(f"Aᵀ·A {batch}x3072x768 (gram)", lambda: tg.gram(a, out, tall=True), lambda: torch.bmm(a.mT, a, out=out))
    w, w_proj = _bf16(3072, 768, scale=0.03), _bf16(3072, 768, scale=0.03)
    for tokens in (16384, 49152):
        x, post = _bf16(tokens, 768), _bf16(tokens, 3072).relu().square()
        add(f"linear+ReLU² fwd {tokens} tokens", lambda: tg.linear_relu_square(x, w),
            lambda: (x @ w.T).relu().square())
        add(f"linear+ReLU² bwd (dpre) {tokens} tokens", lambda: tg.linear_relu_square_backward(x, w_proj, post),
            lambda: (x @ w_proj.T) * 2 * post.sqrt())
        xg, fc, proj = x.clone().requires_grad_(), w.clone().requires_grad_(), w_proj.clone().requires_grad_()
        grad = _bf16(tokens, 768)  # a real gradient: .sum() would hand the backward a stride-0 one
        add(f"MLP fwd+bwd {tokens} tokens", lambda: tg.ReLUSquareMLP.apply(xg, fc, proj).backward(grad),
            lambda: ((xg @ fc.T).relu().square() @ proj).backward(grad))
    compiled_reference = torch.compile(tg.reference_qkv_heads, dynamic=False)
    for paired, shift_keys in QKV_LAYOUTS:
        qkv, cos, sin = qkv_inputs(49152, 6, 128, paired)
        qkv_grad = qkv.clone().requires_grad_()
        grads = [_bf16(49152, 6, 128) for _ in range(3)]
        layout = f"{'paired' if paired else 'plain'}{', shifted keys' if shift_keys else ''}"
        add(f"q/k norm+rotary fwd 49152 tokens, {layout} (vs Inductor)",
            lambda: tg.qkv_heads_forward(qkv, cos, sin, 6, paired, shift_keys),
            lambda: compiled_reference(qkv, cos, sin, 6, paired, shift_keys))
        add(f"q/k norm+rotary fwd+bwd 49152 tokens, {layout} (vs Inductor)",
            lambda: torch.autograd.backward(tg.QKVHeads.apply(qkv_grad, cos, sin, 6, paired, shift_keys), grads),
            lambda: torch.autograd.backward(compiled_reference(qkv_grad, cos, sin, 6, paired, shift_keys), grads))
    w_head = _bf16(768, 50304, scale=0.005)
    mtp = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    for tokens in (16384, 49152):
        x = _bf16(tokens, 768)
        targets = torch.randint(0, 50304, (tokens,), device="cuda")
        xg, wg = x.clone().requires_grad_(), w_head.clone().requires_grad_()

        def eager_loss(x, w):
            z = tg.SOFTCAP * torch.sigmoid(((x @ w).float() + tg.SOFTCAP_SHIFT) / tg.SOFTCAP_DIVISOR)
            return torch.nn.functional.cross_entropy(z, targets, reduction="sum")
        add(f"FP8 softcap CE fwd {tokens} rows", lambda: tg.FP8SoftcapMTPLoss.apply(x, w_head, targets, mtp),
            lambda: eager_loss(x, w_head))
        add(f"FP8 softcap CE fwd+bwd {tokens} rows",
            lambda: tg.FP8SoftcapMTPLoss.apply(xg, wg, targets, mtp).backward(),
            lambda: eager_loss(xg, wg).backward())
    for rows_in_table in (50304, 251520):  # the token and value tables, the bigram table
        indices, sorted_rows, order, grad, table_grad = _embedding_grad_inputs(rows_in_table)

        def dense():
            sums = torch.zeros(rows_in_table, 768, device="cuda").index_add_(0, indices, grad.float())
            return table_grad.add_(sums.to(torch.bfloat16))
        add(f"embedding gradient 49152 tokens into {rows_in_table} rows, sorted (vs dense fp32 index_add_)",
            lambda: tg.add_embedding_grad(grad, sorted_rows, order, table_grad), dense)
    rows += _attention_rows()
    polar_express = torch.compile(tg.nesterov_polar_express, **tg.COMPILE_OPTIONS)
    for batch, m in ((40, 768), (24, 3072)):
        grad, buf = torch.randn(batch, m, 768, device="cuda"), torch.randn(batch, m, 768, device="cuda")
        add(f"Nesterov+Polar Express {batch}x{m}x768 (vs eager bf16)",
            lambda: polar_express(grad, buf, torch.tensor(0.95)),
            lambda: reference_polar_express(grad, buf, 0.95, torch.bfloat16, math_dtype=torch.bfloat16))
    return rows


def _attention_rows():
    """FA4 against PyTorch's attention, forward + backward, per stage on one GPU's micro-batch: a plain
    and a paired-heads layer at the short window, a plain one at the long (the model has those three)."""
    if tg.attention_backend("auto", "cuda") != "fa4":
        return []
    from train_test import fineweb_like_batch  # FineWeb-like documents, padded as the loader pads them
    rows = []
    scale = torch.tensor(128 ** -0.5, dtype=torch.float64)
    for stage in tg.ALL_STAGES:
        tokens = stage.batch_tokens // tg.SLOTS_PER_STEP
        cu_seqlens = fineweb_like_batch(tokens, stage.max_seq_len).cu_seqlens
        for paired, blocks in ((False, stage.windows[0]), (True, stage.windows[0]), (False, stage.windows[1])):
            heads, positions = (3, 2 * tokens) if paired else (6, tokens)
            cu, max_len = (2 * cu_seqlens, 2 * stage.max_seq_len) if paired else (cu_seqlens, stage.max_seq_len)
            q, k, v, grad = (_bf16(positions, heads, 128) for _ in range(4))
            window = torch.tensor(tg.WINDOW_BLOCK * blocks, dtype=torch.int32)

            def forward_backward(backend):
                out, lse = tg.attention_forward(q, k, v, cu, max_len, window, scale, backend)
                return tg.attention_backward(grad, q, k, v, out, lse, cu, max_len, window, scale, backend)
            name = (f"attention fwd+bwd {stage.name}, {tokens} tokens, {'paired' if paired else 'plain'}, "
                    f"window {tg.WINDOW_BLOCK * blocks} (FA4 vs PyTorch)")
            rows.append((name, *(_median_us(lambda: forward_backward(backend)) for backend in ("fa4", "torch"))))
    return rows


# quack's tilings of the linear+ReLU² GEMMs: the default (train_gpt.QUACK_TILING), then the runners-up
QUACK_TILINGS = (dict(), dict(cluster_M=1, cluster_N=2, max_swizzle_size=8), dict(max_swizzle_size=8),
                 dict(tile_M=192, tile_N=128), dict(tile_N=128, cluster_M=1, cluster_N=2, max_swizzle_size=8))


def _sweep_rows():
    """Configurations and shapes behind the defaults and the cuBLAS dispatch (µs)."""
    rows = []
    sym_configs = [dict(block_m=64, num_warps=4, num_stages=4), dict(block_m=128, num_warps=8, num_stages=4),
                   dict(block_m=128, num_warps=8, num_stages=3), dict(block_m=128, num_warps=4, num_stages=3)]
    for op, m, batches in (("XXT", 768, (5, 10, 20, 40)), ("XTX", 3072, (3, 6, 12, 24))):
        for batch in batches:
            a, out = _bf16(batch, m, 768), _bf16(batch, 768, 768)
            fn = tg.XXT if op == "XXT" else tg.XTX
            ref = (lambda: torch.bmm(a, a.mT, out=out)) if op == "XXT" else (lambda: torch.bmm(a.mT, a, out=out))
            rows.append((f"{op} {batch}x{m}x768 bmm", _median_us(ref)))
            for cfg in sym_configs:
                rows.append((f"{op} {batch}x{m}x768 {cfg}", _median_us(lambda: fn(a, out, **cfg))))
    w, w_proj = _bf16(3072, 768, scale=0.03), _bf16(3072, 768, scale=0.03)
    for tokens in (16384, 49152):
        x, post = _bf16(tokens, 768), _bf16(tokens, 3072).relu()
        for cfg in (dict(), dict(persistent=False), dict(block_n=128, num_stages=4), dict(block_m=256, block_n=128)):
            rows.append((f"linear+ReLU² fwd {tokens} {cfg}",
                         _median_us(lambda: tg.triton_linear_relu_square(x, w, **cfg))))
        dpre = torch.empty_like(post)
        rows.append((f"linear+ReLU² bwd {tokens} Triton",
                     _median_us(lambda: tg._launch_linear_relu_square(x, w_proj, post, dpre, True))))
        for cfg in QUACK_TILINGS if QUACK else ():
            rows.append((f"linear+ReLU² fwd {tokens} quack {cfg}",
                         _median_us(lambda: tg.quack_linear_relu_square(x, w, dpre, **cfg))))
            rows.append((f"linear+ReLU² bwd {tokens} quack {cfg}",
                         _median_us(lambda: tg.quack_linear_relu_square(x, w_proj, dpre, post, **cfg))))
        rows.append((f"x @ w.T {tokens} (cuBLAS)", _median_us(lambda: x @ w.T)))
    qkv, cos, sin = qkv_inputs(49152, 6, 128, paired=True)
    grads = [_bf16(49152, 6, 128) for _ in range(3)]
    for cfg in (dict(block=16, num_warps=2), dict(block=32, num_warps=4), dict(block=32, num_warps=2),
                dict(block=64, num_warps=8)):  # the default first
        rows.append((f"q/k norm+rotary fwd 49152 paired {cfg}",
                     _median_us(lambda: tg.qkv_heads_forward(qkv, cos, sin, 6, True, False, **cfg))))
        rows.append((f"q/k norm+rotary bwd 49152 paired {cfg}",
                     _median_us(lambda: tg.qkv_heads_backward(*grads, qkv, cos, sin, 6, True, False, **cfg))))
    grad_f8 = _bf16(49152, 50304).to(torch.float8_e5m2)
    for cfg in (tg.FP8_TRANSPOSE_TILE, dict(block_m=64, block_n=64, num_warps=4),
                dict(block_m=128, block_n=64, num_warps=8),
                dict(block_m=128, block_n=128, num_warps=8), dict(block_m=128, block_n=128, num_warps=4),
                dict(block_m=32, block_n=128, num_warps=4)):  # the default first, then the tiles it was chosen over
        rows.append((f"transpose e5m2 49152x50304 {cfg}", _median_us(lambda: tg.transposed(grad_f8, **cfg))))
    del grad_f8
    _, sorted_rows, order, grad, table_grad = _embedding_grad_inputs(50304)
    for cfg in (dict(), dict(block_d=64, num_warps=2), dict(chunk=32, block_d=64, num_warps=2), dict(chunk=128),
                dict(block_d=256), dict(num_warps=8), dict(tail=64), dict(tail=256)):  # the default first
        rows.append((f"embedding gradient 49152 into 50304 rows {cfg}",
                     _median_us(lambda: tg.add_embedding_grad(grad, sorted_rows, order, table_grad, **cfg))))
    x, w_head = _bf16(16384, 768), _bf16(768, 50304, scale=0.005)
    targets = torch.randint(0, 50304, (16384,), device="cuda")
    mtp = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    logits = _bf16(16384, 50304, scale=4)
    grad_f8 = torch.empty_like(logits, dtype=torch.float8_e5m2)
    one = torch.ones((), device="cuda")
    x_f8, w_f8 = x.to(torch.float8_e4m3fn), w_head.to(torch.float8_e4m3fn)
    pieces = {
        "CE kernel (CUDA, training's), loss + gradient": lambda: tg.softcap_ce_with_grad(logits, targets, mtp, 100.0),
        "e4m3 logits matmul": lambda: torch._scaled_mm(x_f8, tg.transposed(w_f8).mT, scale_a=one, scale_b=one,
                                                       out_dtype=torch.bfloat16, use_fast_accum=True),
        "grad_x matmul": lambda: torch._scaled_mm(grad_f8, w_f8.mT, scale_a=one, scale_b=one,
                                                  out_dtype=torch.bfloat16),
        "transpose grad_f8": lambda: tg.transposed(grad_f8),
        "grad_w matmul": lambda: torch._scaled_mm(tg.transposed(x_f8), tg.transposed(grad_f8).mT, scale_a=one,
                                                  scale_b=one, out_dtype=torch.bfloat16),
    }
    for name, fn in pieces.items():
        rows.append((f"{name} (16384 rows)", _median_us(fn)))
    del logits, grad_f8
    logits = _bf16(49152, 50304, scale=4)
    targets = torch.randint(0, 50304, (49152,), device="cuda")
    for cfg in (dict(), dict(threads=1024, unroll=2), dict(threads=256, unroll=4, blocks_per_sm=4),
                dict(threads=512, unroll=1), dict(threads=512, unroll=8)):  # the default first
        rows.append((f"CE kernel (CUDA), loss + gradient, 49152 rows {cfg}",
                     _median_us(lambda: tg.softcap_ce_with_grad(logits, targets, mtp, 100.0, **cfg))))
    return rows


def bench(sweep):
    if not GPU:
        sys.exit("kernels_test.py --bench needs a CUDA GPU")
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {tg.triton.__version__}, "
          "median µs (triton.testing.do_bench)")
    if sweep:
        for name, t in _sweep_rows():
            print(f"{name:<70} {t:9.1f}")
    print("| kernel | ours (µs) | PyTorch (µs) | speed-up |\n|---|---|---|---|")
    for name, ours, theirs in _bench_rows():
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench(sweep="--sweep" in sys.argv)
    elif {"-h", "--help"} & set(sys.argv):
        print(__doc__.strip() + "\n\nOther arguments go to pytest (pytest --help lists them).")
    else:
        sys.exit(pytest.main([__file__, *sys.argv[1:]]))
