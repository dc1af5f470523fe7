"""Model and optimizer tests: a tiny fp32 model on CPU (reference attention, interpreter kernels),
the optimizer against independent references, and the distributed optimizer with gloo in 1, 2 and
4 processes. GPU tests (full-size compiled model, varlen attention, FP8 loss, NCCL) skip on CPU."""
import itertools
import json
import math
import re
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import profile_gpt
import train_gpt as tg
from conftest import replaced

GPU = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.abspath(__file__))  # the repository: train_gpt.py, run.sh, data/
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
TINY = dict(vocab_size=512, num_heads=6, head_dim=16, model_dim=96, max_len=512)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return tg.GPT(**{**TINY, "dtype": torch.float32, **kw})


def tiny_batch(model, T=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, model.vocab_size, (T,), generator=g, dtype=torch.int32)
    cut = sorted(torch.randint(1, T, (3,), generator=g).tolist())
    inputs[[0] + cut] = tg.BOS_ID % model.vocab_size
    cu = torch.tensor([0] + cut + [T] * 4, dtype=torch.int32)
    targets = torch.randint(0, model.vocab_size, (T,), generator=g)
    bigram = torch.from_numpy(tg.bigram_hash(inputs.numpy(), model.bigram_vocab_size))
    return inputs, targets, cu, bigram


def randomize(model, seed=1):
    """Non-trivial values for the parameters that start at zero, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# --- model ---------------------------------------------------------------------------------------

def test_tiny_model_forward_backward():
    model = tiny_model()
    batch = tiny_batch(model)
    eval_loss = model(*batch, max_seq_len=128, windows=tg.window_tensor((1, 3)))
    assert abs(eval_loss.item() - math.log(model.vocab_size)) < 0.5  # an untrained model is near uniform
    randomize(model)
    loss = model(*batch, max_seq_len=128, windows=tg.window_tensor((1, 3)), mtp_weights=torch.tensor([1.0, 0.5, 0.25]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "scalars":  # the padding entries of scalars are unused
            assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    assert model.mlp_bank.grad[-1].abs().sum() == 0, "the padding MLP must not be used"


def test_training_loss_relates_to_eval_loss():
    """With MTP weights [1] the summed training loss is rows x the mean eval loss."""
    model = tiny_model()
    randomize(model)
    batch = tiny_batch(model)
    eval_loss = model(*batch, max_seq_len=128, windows=tg.window_tensor((1, 3)))
    train_loss = model(*batch, max_seq_len=128, windows=tg.window_tensor((1, 3)), mtp_weights=torch.tensor([1.0]))
    assert torch.allclose(train_loss, eval_loss * batch[0].numel(), rtol=1e-5)


def test_rotary_is_a_complex_rotation():
    rot = tg.Rotary(head_dim=128, max_len=300, device="cpu")
    x = torch.randn(300, 2, 128)
    out = tg.rotate(x, rot.cos.float(), rot.sin.float())
    freqs = torch.cat([(1 / 1024) ** torch.linspace(0, 1, 32, dtype=torch.float64),
                       torch.zeros(32, dtype=torch.float64)])
    angles = torch.arange(300, dtype=torch.float64)[:, None, None] * freqs
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous()) * torch.exp(-1j * angles)
    ref = torch.view_as_real(z).flatten(-2)
    assert ((out - ref).norm() / ref.norm()) < 1e-2  # tables are bf16
    assert torch.equal(out[..., 64:], x[..., 64:]), "the second half of the dims is stationary"


def test_yarn_update():
    rot = tg.Rotary(head_dim=128, max_len=64, device="cpu")
    old_freqs = rot.freqs.clone()
    rot.yarn(384, 896)
    rotations = 384 * old_freqs / (2 * math.pi)
    ramp = ((rotations - 1) / 31).clamp(0, 1)
    expected = old_freqs * (384 / 896 + ramp * (1 - 384 / 896))
    assert torch.allclose(rot.freqs, expected)
    assert rot.freqs[0] == old_freqs[0], "the fastest frequencies (many rotations) are not stretched"
    assert rot.freqs[62] < old_freqs[62], "the slowest are"
    assert rot.attn_scale.item() == pytest.approx(0.1 * (0.2 * math.log(896 / 384) + 1))
    angles = torch.arange(64)[:, None] * rot.freqs
    assert torch.allclose(rot.cos[:, 0].float(), angles.cos(), atol=4e-3)
    rot.yarn(896, 1408)
    twice_stretched = 0.1 * (0.2 * math.log(896 / 384) + 1) * (0.2 * math.log(1408 / 896) + 1)
    assert rot.attn_scale.item() == pytest.approx(twice_stretched)
    scale = rot.attn_scale
    rot.reset()
    assert torch.equal(rot.freqs, old_freqs) and rot.attn_scale.item() == 0.1
    assert rot.attn_scale is scale, "rewritten in place: compiled graphs keep reading the same tensor"


def test_reference_attention_equals_per_document_loop():
    T, H, D, window = 70, 2, 8, 5
    q, k, v = torch.randn(3, T, H, D, dtype=torch.float64).unbind(0)
    cu = torch.tensor([0, 20, 21, 55, T, T, T], dtype=torch.int32)
    out = tg.reference_attention(q, k, v, cu, window, scale=0.3)
    ref = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for i in range(start, end):
            keys = slice(max(start, i - window), i + 1)
            weights = torch.softmax(0.3 * torch.einsum("hd,khd->hk", q[i], k[keys]), dim=-1)
            ref[i] = torch.einsum("hk,khd->hd", weights, v[keys])
    assert torch.allclose(out, ref)


def flash_scores(q, k, cu_seqlens, window, scale):
    """Scaled scores (heads, T, T), -inf where attention_mask hides a key."""
    mask = tg.attention_mask(q.size(0), cu_seqlens, window)
    return (scale * torch.einsum("thd,shd->hts", q, k)).masked_fill(~mask, -math.inf)


def flash_forward(q, k, v, cu_seqlens, max_seq_len, window, scale, backend):
    """A flash kernel's contract, written out: the output and the log-sum-exp of the scores (heads, T)."""
    scores = flash_scores(q, k, cu_seqlens, window, scale)
    lse = scores.logsumexp(-1)
    return torch.einsum("hts,shd->thd", (scores - lse[..., None]).exp(), v), lse


def flash_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seq_len, window, scale, backend):
    """A flash kernel's backward, written out: probabilities from the lse it is given, and the row sums
    of out * grad_out."""
    probs = (flash_scores(q, k, cu_seqlens, window, scale) - lse[..., None]).exp()
    grad_probs = torch.einsum("thd,shd->hts", grad_out, v)
    grad_scores = probs * (grad_probs - (out * grad_out).sum(-1).T[..., None])
    return (scale * torch.einsum("hts,shd->thd", grad_scores, k), scale * torch.einsum("hts,thd->shd", grad_scores, q),
            torch.einsum("hts,thd->shd", probs, grad_out))


def test_gated_attention_backward_through_the_lse_gives_the_gated_gradients(monkeypatch):
    """GatedAttention hands the kernel's backward lse - log(gate) and the gated output's gradient; with
    a kernel that keeps the flash contract, that yields the gradients of reference attention times the
    gate. Inputs in fp64; GatedAttention takes log(gate) and the gate's gradient in fp32, hence fp32's
    relative error (about 1e-7) with a margin."""
    monkeypatch.setattr(tg, "attention_forward", flash_forward)
    monkeypatch.setattr(tg, "attention_backward", flash_backward)
    T, H, D, window, scale = 50, 3, 8, 6, 0.3
    cu = torch.tensor([0, 20, 21, 44, T, T], dtype=torch.int32)
    q, k, v = (torch.randn(T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    gate = torch.rand(T, H, dtype=torch.float64).clamp(min=0.01).requires_grad_()
    grad_out = torch.randn(T, H, D, dtype=torch.float64)
    out = tg.GatedAttention.apply(q, k, v, gate, cu, T, torch.tensor(window, dtype=torch.int32),
                                  torch.tensor(scale, dtype=torch.float64), "flash")
    grads = torch.autograd.grad(out, (q, k, v, gate), grad_out)
    ref = tg.reference_attention(q, k, v, cu, window, scale) * gate[..., None]
    ref_grads = torch.autograd.grad(ref, (q, k, v, gate), grad_out)
    for name, got, want in zip(("out", "dq", "dk", "dv", "dgate"), (out, *grads), (ref, *ref_grads)):
        assert ((got - want).norm() / want.norm()).item() < 1e-5, name


def test_attention_backend_choice():
    hopper, ampere, blackwell = (9, 0), (8, 0), (10, 0)
    choose = tg.choose_attention_backend
    assert choose("auto", None, True) == "reference"
    assert choose("auto", hopper, True) == "fa4" and choose("auto", blackwell, True) == "fa4"
    assert choose("auto", hopper, False) == "torch" and choose("auto", ampere, True) == "torch"
    assert choose("torch", hopper, True) == "torch" and choose("fa4", hopper, True) == "fa4"
    with pytest.raises(tg.UsageError, match=r"^--attention fa4 is not available here \(sm90\): it needs "
                                            r"FlashAttention 4 .*pip install flash-attn-4==4\.0\.0b36; or use"):
        choose("fa4", hopper, False)
    with pytest.raises(tg.UsageError, match=r"--attention fa4 is not available here \(sm80\)"):
        choose("fa4", ampere, True)
    with pytest.raises(tg.UsageError, match=r"--attention torch is not available here \(no CUDA GPU\)"):
        choose("torch", None, True)
    if not GPU:  # this machine: auto falls back to the reference; a forced GPU backend is refused
        assert tg.attention_backend("auto", "cpu") == "reference"
        with pytest.raises(tg.UsageError, match=r"--attention fa4 is not available here \(no CUDA GPU\)"):
            tg.attention_backend("fa4", "cpu")


@pytest.mark.parametrize("layer", [0, 2])  # paired heads without / with value embeddings
def test_paired_head_attention_equals_straightforward_construction(layer):
    model = tiny_model()
    randomize(model)
    T, h, hd = 40, model.num_heads, model.head_dim
    x = torch.randn(T, h * hd)
    ve = torch.randn(T, h * hd)
    cu = torch.tensor([0, 15, T, T], dtype=torch.int32)
    W, sa = model.attn_bank[layer].detach(), (model.scalars[2 * layer].detach(), model.scalars[2 * layer + 1].detach())
    ve_gate, attn_gate = model.ve_gate_bank[1].detach(), model.attn_gate_bank[layer].detach()
    with torch.no_grad():
        out = model.attn(x, tg.LAYERS[layer], W, attn_gate, sa, cu, 16, 8, (ve, ve_gate) if layer == 2 else None)
    # straightforward: token t, head h -> rotary position 2t + h % 2, sequence position 2t + h // 3, slot h % 3
    q, k, v = (x @ (sa[0] * W[:3 * h * hd]).T).view(T, 3, h, hd).unbind(1)
    q, k = tg.norm(q), tg.norm(k)
    if layer == 2:
        v = v + (2 * torch.sigmoid(x[:, :tg.GATE_DIM] @ ve_gate.T))[..., None] * ve.view(T, h, hd)
    cos, sin = model.rotary.cos.float(), model.rotary.sin.float()
    q2, k2, v2 = (torch.empty(2 * T, h // 2, hd) for _ in range(3))
    for t in range(T):
        for head in range(h):
            pos, seq, slot = 2 * t + head % 2, 2 * t + head // 3, head % 3
            q2[seq, slot] = tg.rotate(q[t, head], cos[pos, 0], sin[pos, 0])
            k2[seq, slot] = tg.rotate(k[t, head], cos[pos, 0], sin[pos, 0])
            v2[seq, slot] = v[t, head]
    y2 = tg.reference_attention(q2, k2, v2, 2 * cu, 8, model.rotary.attn_scale)
    y = torch.empty(T, h, hd)
    for t in range(T):
        for head in range(h):
            y[t, head] = y2[2 * t + head // 3, head % 3]
    y = y * torch.sigmoid(x[:, :tg.GATE_DIM] @ attn_gate.T)[..., None]
    ref = y.reshape(T, h * hd) @ (sa[1] * W[3 * h * hd:]).T
    assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2)  # tables are bf16, the rounding points differ
    assert ((out - ref).norm() / ref.norm()) < 5e-3


# --- optimizer pieces against references ---------------------------------------------------------

def reference_normuon(p, grad, momentum, lr, lr_mul, weight_decay, beta2, c_proj):
    """One NorMuon step from zero state, written out in plain fp64."""
    p, grad = p.double(), grad.double()
    buf = (1 - momentum) * grad
    g = grad + momentum * (buf - grad)
    X = g / (g.norm() * tg.NORM_MARGIN + tg.NORM_EPS)
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    for a, b, c in tg.POLAR_EXPRESS_COEFFS:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    X = X.T if tall else X
    rows, cols = X.shape
    dim = 1 if rows >= cols else 0
    m = (X ** 2).mean(dim, keepdim=True)
    n = (m.sum() * X.size(dim)).sqrt()
    v2 = (1 - beta2) * m
    s = v2.clamp_min(1e-10).rsqrt()
    n2 = (m * X.size(dim) * s ** 2).sum().sqrt()
    X = X * s * (n / n2)
    eff_lr = lr * lr_mul * max(1, rows / cols) ** 0.5 * (2 if c_proj else 1)
    mask = (X * p) >= 0
    return p - p * mask * weight_decay * lr * eff_lr - X * eff_lr


def test_normuon_step_matches_reference():
    """attn: square matrices (wide form); mlp: tall matrices, c_proj at odd indices."""
    model = tiny_model()
    opt = tg.NorMuonAdam(model)
    before, grads = {}, {}
    for label in ("attn", "mlp"):
        before[label] = opt._view(label).detach().clone()
        opt.params[label].grad = torch.randn_like(opt.params[label])
        grads[label] = opt.params[label].grad.view_as(before[label]).clone()
    opt.step(lr_multiplier=0.7, momentum=0.9, adam_step=False)
    for label in ("attn", "mlp"):
        after = opt._view(label).detach()
        for i in (0, 1, before[label].size(0) - 1):
            ref = reference_normuon(before[label][i], grads[label][i], 0.9, 0.023 * 0.7, 1.0, 1.2, 0.95,
                                    c_proj=label == "mlp" and i % 2 == 1)
            assert ((after[i] - ref).norm() / (ref - before[label][i]).norm()) < 1e-3, f"{label} matrix {i}"


def test_mantissa_update_stays_within_one_bf16_ulp():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(64, 32, generator=g)
    p = reference.to(torch.bfloat16)
    initial, reference = p.clone(), p.float()
    mantissa = torch.zeros(64, 32, dtype=torch.uint16)
    lr, decay = torch.full((1, 1), 1e-3), torch.tensor(0.5)
    for _ in range(50):
        X = torch.randn(64, 32, generator=g)
        tg.normuon_apply(p, mantissa, X, lr, decay)
        reference = reference - reference * ((X * reference) >= 0) * (decay * lr) - X * lr
    combined = ((p.view(torch.int16).to(torch.int32) << 16) | mantissa.to(torch.int32)).view(torch.float32)
    assert torch.allclose(combined, reference, rtol=1e-6, atol=1e-7)
    ulp = torch.finfo(torch.bfloat16).eps * p.float().abs()
    assert ((p.float() - reference).abs() <= ulp).all()
    # the same 50 updates applied to a plain bf16 weight: rounding loses most of their effect
    naive, g = initial.clone(), torch.Generator().manual_seed(0)
    torch.randn(64, 32, generator=g)  # the draw of the initial weights, as above
    for _ in range(50):
        X, weight = torch.randn(64, 32, generator=g), naive.float()
        naive = (weight - weight * ((X * weight) >= 0) * (decay * lr) - X * lr).to(torch.bfloat16)
    moved = (reference - initial.float()).abs().mean()
    assert (naive.float() - reference).abs().mean() > 0.5 * moved > 100 * (combined - reference).abs().mean()


def test_adam_with_cautious_decay_matches_reference():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(40, 8, generator=g)
    ref = p.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ref_m, ref_v = torch.zeros_like(ref), torch.zeros_like(ref)
    beta1, beta2, eps, lr, wd = 0.5, 0.95, 1e-10, 0.01, 0.005 * 150
    count = torch.zeros(())
    for t in range(1, 4):
        grad = torch.randn(40, 8, generator=g)
        count += 1
        tg.adam_update(p, grad, m, v, count, torch.tensor(lr), torch.tensor(lr * lr * wd), beta1, beta2, eps)
        ref_m = beta1 * ref_m + (1 - beta1) * grad.double()
        ref_v = beta2 * ref_v + (1 - beta2) * grad.double() ** 2
        u = ref_m / (ref_v.sqrt() + eps) * lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        u = u + lr * lr * wd * ref * (u * ref > 0)
        ref = ref - u
    assert torch.allclose(p.double(), ref, rtol=1e-5, atol=1e-7)


# --- the distributed optimizer (gloo) ------------------------------------------------------------
# Every step draws 8 "slot" gradients per parameter (integers * 2^-12, so sums are exact in any
# order); rank r of W gets the slots s with s % W == r, like the data loader. bigram_embed slot
# gradients touch only that slot's rows.

STEPS, SPLIT_STEP = 8, 5


def slot_gradients(model, step, slot):
    """The same draws for every world size (scalars' padding, which depends on it, gets zeros)."""
    def draw(name, shape):
        g = torch.Generator().manual_seed(zlib.crc32(f"{step} {slot} {name}".encode()))
        return torch.randint(-1000, 1000, shape, generator=g).float() * 2 ** -12
    grads = {name: draw(name, p.shape) for name, p in model.named_parameters()}
    used = tg.NUM_SCALARS
    grads["scalars"][used:] = 0
    rows = torch.randperm(model.bigram_vocab_size, generator=torch.Generator().manual_seed(8 * step + slot))[:30]
    mask = torch.zeros(model.bigram_vocab_size, 1)
    mask[rows] = 1
    grads["bigram_embed"] *= mask
    return grads, rows.numpy()


def run_optimizer(rank, world_size, sparse, port, out_dir, device_type="cpu"):
    tg.configure_torch()  # a process of its own, as main's
    device = torch.device(device_type, rank if device_type == "cuda" else 0)
    if world_size > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world_size)
    model = tiny_model(device=device)
    opt = tg.NorMuonAdam(model, rank, world_size, sparse_bigram=sparse)
    for step in range(STEPS):
        adam_step = step % 2 == 1
        slots = [slot_gradients(model, step, slot) for slot in range(rank, 8, world_size)]
        opt.before_forward([rows for _, rows in slots], adam_step)
        for grads, _ in slots:
            for name, p in model.named_parameters():
                grad = grads[name].to(device)
                p.grad = grad if p.grad is None else p.grad + grad
        opt.step(lr_multiplier=1.0 - 0.05 * step, momentum=0.9, adam_step=adam_step)
        if step == SPLIT_STEP:
            opt.untie()
        if step < SPLIT_STEP:
            assert torch.equal(model.embed, model.lm_head.T)
    torch.save({n: p.detach().cpu() for n, p in model.named_parameters()},
               os.path.join(out_dir, f"{device_type}_w{world_size}_{'sparse' if sparse else 'dense'}_r{rank}.pt"))
    if world_size > 1:
        dist.destroy_process_group()


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def optimizer_runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("optimizer_runs"))
    for world_size, sparse in ((1, False), (2, False), (4, False), (2, True), (4, True), (8, True)):
        if world_size == 1:
            run_optimizer(0, 1, False, None, out_dir)
        else:
            mp.spawn(run_optimizer, args=(world_size, sparse, _free_port(), out_dir), nprocs=world_size)
    def load(world_size, sparse, rank):
        return torch.load(os.path.join(out_dir, f"cpu_w{world_size}_{'sparse' if sparse else 'dense'}_r{rank}.pt"))
    return load


@pytest.mark.parametrize("world_size,sparse", [(2, False), (4, False), (2, True), (4, True), (8, True)])
def test_distributed_optimizer_matches_single_process(optimizer_runs, world_size, sparse):
    single = optimizer_runs(1, False, 0)
    for rank in range(world_size):
        params = optimizer_runs(world_size, sparse, rank)
        for name, ref in single.items():
            got = params[name]
            if name == "scalars":  # the padding depends on the world size
                ref, got = ref[:tg.NUM_SCALARS], got[:tg.NUM_SCALARS]
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), f"{name} on rank {rank} of {world_size}"


def test_optimizer_moved_every_parameter(optimizer_runs):
    torch.manual_seed(0)
    initial = dict(tiny_model().named_parameters())
    final = optimizer_runs(1, False, 0)
    for name, p in initial.items():
        assert not torch.equal(final[name], p.detach()), f"{name} never changed"
    assert not torch.equal(final["embed"], final["lm_head"].T), "embed and lm_head stay tied after the split"


def test_sparse_and_dense_bigram_exchange_agree(optimizer_runs):
    for world_size in (2, 4):
        dense, sparse = optimizer_runs(world_size, False, 0), optimizer_runs(world_size, True, 0)
        assert torch.equal(dense["bigram_embed"], sparse["bigram_embed"])


def accumulate_slot_gradients(model, step, slots):
    for slot in slots:
        grads, rows = slot_gradients(model, step, slot)
        for name, p in model.named_parameters():
            if p.grad is None:
                p.grad = grads[name].clone()
            else:
                p.grad += grads[name]


def test_emulated_rank_updates_its_shards_as_one_process_does():
    """communicate=False with world size 8: rank 0's shards move exactly as the whole tensors of a
    one-process run (whose math every world size shares, above), the other shards not at all."""
    runs = {}
    for emulate in (False, True):
        model = tiny_model()
        opt = tg.NorMuonAdam(model, 0, 8, communicate=False) if emulate else tg.NorMuonAdam(model)
        for step in range(SPLIT_STEP):  # tied embedding throughout: the emulation never unties
            accumulate_slot_gradients(model, step, range(8))
            opt.step(lr_multiplier=1.0 - 0.05 * step, momentum=0.9, adam_step=step % 2 == 1)
        runs[emulate] = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(0)
    initial = {name: p.detach() for name, p in tiny_model().named_parameters()}
    opt = tg.NorMuonAdam(tiny_model(), 0, 8, communicate=False)
    for group in tg.PARAM_GROUPS:
        if group.label == "embed":  # a copy of lm_head while tied
            continue
        shape = opt._view(group.label).shape  # sharded along dim 0 of this view
        full, emulated, start = (t.reshape(shape) for t in (runs[False][group.attr], runs[True][group.attr],
                                                             initial[group.attr]))
        own = opt._chunk(group.label, torch.arange(full.size(0)))
        assert torch.equal(emulated[own], full[own]), group.label
        others = torch.ones(full.size(0), dtype=torch.bool)
        others[own] = False
        assert torch.equal(emulated[others], start[others]), group.label
        assert not torch.equal(full[own], start[own]), f"{group.label} never moved"


def test_step_zeroes_the_consumed_gradients_in_place():
    """CUDA graphs add into the .grad tensors they were captured with: step() must keep those tensors,
    zero what it consumed and leave the Adam gradients of a non-Adam step to accumulate."""
    model = tiny_model()
    opt = tg.NorMuonAdam(model)
    for adam_step in (False, True):
        accumulate_slot_gradients(model, 0, range(2))
        grads = {name: (p.grad, p.grad.clone()) for name, p in model.named_parameters()}
        opt.step(1.0, 0.9, adam_step=adam_step)
        for group in tg.PARAM_GROUPS:
            grad, before = grads[group.attr]
            p = getattr(model, group.attr)
            assert p.grad is grad, group.label
            consumed = group.optim == "normuon" or adam_step
            assert torch.equal(grad, torch.zeros_like(grad) if consumed else before), (group.label, adam_step)


def test_state_dict_round_trip():
    model = tiny_model()
    opt = tg.NorMuonAdam(model)
    saved_model = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved_opt = opt.state_dict()
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step(1.0, 0.9, adam_step=step % 2 == 1)
    assert not torch.equal(model.attn_bank, saved_model["attn_bank"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved_model[n])
    opt.load_state_dict(saved_opt)
    assert all((v == 0).all() for v in (opt.state["mlp"]["momentum_buffer"], opt.state["lm_head"]["exp_avg"]))
    assert opt.state["lm_head"]["count"] == 0 and opt.tied


# --- schedule and command line -------------------------------------------------------------------

def test_record_schedule():
    s = tg.Schedule(1450, 40)
    assert s.starts == [0, 483, 967, 1450] and s.total == 1490 and s.split_step == 967
    assert [s.stage_index(x) for x in (0, 482, 483, 966, 967, 1449, 1450, 1489)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert s.warm_up_steps() == [0, 1, 483, 484, 967, 968, 1450, 1451]
    assert s.stage(0).batch_tokens == 131072 and s.stage(483).max_seq_len == 2048 and s.stage(1450).windows == (6, 13)


def test_mtp_weights_interpolate_within_each_stage():
    s = tg.Schedule(1450, 40)
    assert s.mtp_weights(0) == (1.0, 0.5, 0.25)
    assert s.mtp_weights(482) == pytest.approx((1.0, 0.5, 0.25 / 483))  # never exactly 0 inside the stage
    assert s.mtp_weights(483) == (1.0, 0.5)
    assert s.mtp_weights(725) == pytest.approx((1.0, 0.5 * (1 - 242 / 484)))
    assert s.mtp_weights(967) == (1.0,) and s.mtp_weights(1489) == (1.0,)


def test_learning_rate_and_momentum():
    s = tg.Schedule(1450, 40)
    assert s.lr_multiplier(0) == 1.0 and s.lr_multiplier(579) == 1.52 and s.lr_multiplier(580) == 1.52
    assert s.lr_multiplier(1015) == pytest.approx(1.73 * 0.5 + 0.15 * 0.5)
    assert s.lr_multiplier(1449) == pytest.approx(1.73 / 870 + 0.15 * 869 / 870)
    assert s.lr_multiplier(1450) == pytest.approx(0.15) and s.lr_multiplier(1489) == pytest.approx(0.15)
    assert s.momentum(0) == pytest.approx(0.85) and s.momentum(150) == pytest.approx(0.90)
    assert s.momentum(300) == pytest.approx(0.95) and s.momentum(1440) == pytest.approx(0.95)
    assert s.momentum(1465) == pytest.approx(0.90) and s.momentum(1490) == pytest.approx(0.85)


def test_stage_ranges_cover_every_step_once():
    for scheduled, extension in ((1450, 40), (150, 10), (3, 0), (4, 1)):
        s = tg.Schedule(scheduled, extension)
        ranges = s.stage_ranges()
        bounds = [first for _, first, _ in ranges] + [ranges[-1][2]]
        assert bounds[0] == 0 and bounds[-1] == scheduled + extension and bounds == sorted(set(bounds))
        assert all(end == next_first for (_, _, end), (_, next_first, _) in zip(ranges, ranges[1:]))
        for name, first, end in ranges:
            assert {s.stage_index(step) for step in range(first, end)} == {["stage 1", "stage 2", "stage 3",
                                                                             "extension"].index(name)}
    assert tg.Schedule(150, 10).stage_ranges() == [("stage 1", 0, 50), ("stage 2", 50, 100), ("stage 3", 100, 150),
                                                   ("extension", 150, 160)]
    assert [name for name, _, _ in tg.Schedule(3, 0).stage_ranges()] == ["stage 1", "stage 2", "stage 3"]


def test_adam_steps_and_the_split_step():
    s = tg.Schedule(1450, 40)
    assert [s.adam_step(x) for x in (0, 1, 2, 966, 967, 968, 969)] == [False, True, False, False, True, False, True]
    short = tg.Schedule(150, 10)
    assert short.split_step == 100 and short.adam_step(100) and short.adam_step(99) and short.adam_step(101)


class RecordingClock:
    """TrainingClock's interface on the host: it records when it starts and stops."""

    def __init__(self, events):
        self.events, self.running, self.seconds = events, False, 0.0

    def start(self):
        self.running = True
        self.events.append(("start",))

    def stop(self):
        self.running = False
        self.events.append(("stop",))

    def launched(self, step, step_loss):
        self.events.append(("launched", step))

    def keep_up(self):
        pass


@pytest.mark.parametrize("val_loss_every", [0, 1, 7])
def test_every_training_batch_is_drawn_on_the_clock(val_loss_every):
    """The record's clock times its first batch's load: so must ours, and every later draw too."""
    schedule, events = tg.Schedule(30, 3), []
    clock = RecordingClock(events)

    def draw_batches(step):
        events.append(("draw", step, clock.running))
        return [f"batch {step}"]

    def launch_step(step, batches):
        assert batches == [f"batch {step}"]
        return torch.zeros(())

    def validate(windows):
        events.append(("validate", clock.running))
        return 1.0
    assert tg.timed_loop(schedule, val_loss_every, clock, draw_batches, launch_step, validate,
                         lambda line: None) == 1.0  # the final validation's
    draws = [event for event in events if event[0] == "draw"]
    assert [step for _, step, _ in draws] == list(range(schedule.total))
    assert all(on_clock for _, _, on_clock in draws), "a batch was drawn with the clock stopped"
    assert events.index(("start",)) < events.index(draws[0])
    assert [event[1] for event in events if event[0] == "launched"] == list(range(schedule.total))
    validations = [event for event in events if event[0] == "validate"]
    expected = len(range(0, schedule.total, val_loss_every)) + 1 if val_loss_every else 1
    assert len(validations) == expected and not any(on_clock for _, on_clock in validations)


def test_seconds_left_at_the_stage_rate_per_token():
    schedule = tg.Schedule(30, 3)  # stages of 10 steps, then 3 of the extension
    tokens_before = [0, *itertools.accumulate(schedule.stage(step).batch_tokens for step in range(schedule.total))]
    # stage 1 at 2 s per step, stage 2 at 3 s: stage 2 runs its 262,144 tokens a step at 3 / 262,144 s each
    step_ends = [2.0 * (step + 1) for step in range(10)] + [20.0 + 3.0 * (step - 9) for step in range(10, 15)]
    left = tg.seconds_left(step_ends, tokens_before, 10, 14)
    remaining = 5 * 262144 + 13 * 393216  # stage 2's last 5 steps, stage 3's 10 and the extension's 3
    assert left == pytest.approx(3.0 / 262144 * remaining)
    assert tg.seconds_left(step_ends, tokens_before, 0, 0) == pytest.approx(2.0 / 131072 * (tokens_before[-1] - 131072))


def test_heartbeat_logs_while_the_body_runs():
    lines = []
    with tg.heartbeat(lines.append, "warm-up step 1 of 8", time.perf_counter(), every=0.05):
        time.sleep(0.3)
    count = len(lines)
    time.sleep(0.15)
    assert count >= 3 and all("warm-up step 1 of 8: still running" in line for line in lines)
    assert len(lines) == count, "the heartbeat went on after the body"


def test_the_target_is_judged_on_fineweb_only(small_data, tmp_path):
    val_file = tg.shard_files(small_data[small_data.index("--val_files") + 1])[0]
    assert tg.target_verdict(0.99, val_file) == "synthetic data: no target"
    fineweb = tmp_path / "fineweb_val_000000.bin"  # a shard with FineWeb's header: word 3 is 0
    header = np.zeros(tg.HEADER_WORDS, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, 3
    fineweb.write_bytes(header.tobytes() + np.array([tg.BOS_ID, 1, 2], dtype="<u2").tobytes())
    assert tg.target_verdict(3.2799, str(fineweb)) == "the 3.28 target reached"
    assert tg.target_verdict(3.2801, str(fineweb)) == "the 3.28 target NOT reached"


def test_command_line():
    hp, check = tg.parse_args(["--num_scheduled_iterations", "150", "--val_tokens", "2097152",
                               "--train_files", "x/*.bin", "--save_checkpoint", "--adam_lr", "0.004"])
    assert (hp.num_scheduled_iterations, hp.val_tokens, hp.train_files, hp.save_checkpoint, hp.adam_lr, check) == (
        150, 2097152, "x/*.bin", True, 0.004, None)
    assert hp.num_extension_iterations == 40 and hp.val_files == os.path.join(tg.DATA_DIR, "fineweb10B",
                                                                              "fineweb_val_*.bin")
    assert tg.parse_args(["--save_checkpoint", "False", "--check"]) == (tg.Hyperparameters(), "all")
    assert tg.parse_args(["--check", "arguments"]) == (tg.Hyperparameters(), "arguments")
    # one convention for switches: true / on and false / off, any case; the hyphenated spelling is the flag
    assert tg.parse_args(["--cuda-graphs", "OFF", "--save-checkpoint", "on"])[0] == tg.Hyperparameters(
        cuda_graphs=False, save_checkpoint=True)
    for value in ("maybe", "ture", "y", "1"):
        with pytest.raises(tg.UsageError, match=f"^argument --save_checkpoint: expected true / on or false / off "
                                                f".*not '{value}'"):
            tg.parse_args(["--save_checkpoint", value])
    with pytest.raises(tg.UsageError, match=r"^unrecognized arguments: --lr 3 \(python train_gpt.py --help lists"):
        tg.parse_args(["--lr", "3"])
    with pytest.raises(tg.UsageError, match="unrecognized arguments: --val 3"):  # no abbreviations
        tg.parse_args(["--val", "3"])
    with pytest.raises(tg.UsageError, match=r"^unrecognized arguments: .*train_test.py: the shell expanded a glob; "
                                            "quote --train_files / --val_files patterns"):
        tg.parse_args(["--train_files", __file__, __file__])  # what `--train_files *.py` unquoted gives
    with pytest.raises(tg.UsageError, match="argument --sparse_bigram: invalid choice: 'maybe'"):
        tg.parse_args(["--sparse_bigram", "maybe"])
    with pytest.raises(tg.UsageError, match="argument --attention: invalid choice: 'fa2'"):
        tg.parse_args(["--attention", "fa2"])
    with pytest.raises(tg.UsageError, match="argument --num_scheduled_iterations: invalid int value: '1e3'"):
        tg.parse_args(["--num_scheduled_iterations", "1e3"])


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tg.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit_info.value.code == 0
    for spec in tg.fields(tg.Hyperparameters):
        assert f"--{spec.name}" in text and " ".join(spec.metadata["help"].split()) in text
    assert "--check" in text and "(default: 0.008)" in text and "(default: 1450)" in text
    assert "(default: a fresh uuid)" in text and "(default: )" not in text and tg.DATA_DIR not in text
    assert "--cuda_graphs [{true,false,on,off}]" in text and "--parallel_compile {auto,on,off}" in text


@pytest.mark.parametrize("argv,world_size,message", [
    (["--val_tokens", "1000000"], 1, r"--val_tokens must be a positive multiple of the val batch, 2,097,152 tokens "
                                     r"\(the record validates on 10,485,760\), not 1,000,000"),
    (["--num_scheduled_iterations", "0"], 1, "--num_scheduled_iterations must be at least 3 .*not 0"),
    (["--num_scheduled_iterations", "-5"], 1, "--num_scheduled_iterations must be at least 3 .*not -5"),
    (["--num_extension_iterations", "-1"], 1, "--num_extension_iterations must be 0 or more, not -1"),
    (["--val_loss_every", "-1"], 1, "--val_loss_every must be 0 or more, not -1"),
    (["--muon_lr", "nan"], 1, "--muon_lr must be a positive number up to 10, not nan"),
    (["--adam_lr", "0"], 1, "--adam_lr must be a positive number up to 10, not 0.0"),
    (["--adam_lr", "1e300"], 1, "--adam_lr must be a positive number up to 10, not 1e"),
    (["--adam_eps", "inf"], 1, r"--adam_eps must be a finite number of at least 1.18e-38 \(float32's smallest "),
    (["--adam_eps", "0"], 1, r"--adam_eps must be a finite number of at least 1.18e-38 .*not 0.0"),
    (["--adam_eps", "1e-300"], 1, r"--adam_eps must be a finite number of at least 1.18e-38 .*make it 0, and a zero "
                                  r"gradient's update 0/0\), not 1e-300"),
    (["--seed", "18446744073709551616"], 1, r"--seed must lie in \[0, 2\^64\)"),
    (["--seed", "-1"], 1, r"--seed must lie in \[0, 2\^64\)"),
    (["--muon_weight_decay", "-1"], 1, "--muon_weight_decay must be 0 or a positive number, not -1.0"),
    (["--muon_beta2", "1"], 1, r"--muon_beta2 must lie in \[0, 1\), not 1.0"),
    (["--sparse_bigram", "on"], 1, "--sparse_bigram on exchanges gradients between GPUs, and this run has one"),
    (["--run_id", "a/b"], 1, "--run_id names a file in logs/: letters, digits, '.', '_' and '-' only, not 'a/b'"),
    (["--run_id", ".."], 1, "--run_id names a file in logs/"),
    (["--run_id", "x" * 201], 1, "--run_id names files in logs/: at most 200 characters, not 201"),
])
def test_bad_arguments(argv, world_size, message):
    hp, _ = tg.parse_args(argv)
    with pytest.raises(tg.UsageError, match=f"^{message}"):
        tg.check_arguments(hp, world_size)


def test_good_arguments_pass():
    hp, _ = tg.parse_args(["--sparse_bigram", "on", "--run_id", "my-run_1.2", "--num_scheduled_iterations", "3",
                           "--num_extension_iterations", "0", "--val_loss_every", "0", "--adam_eps", "1.2e-38"])
    tg.check_arguments(hp, 2)


def test_an_adam_epsilon_that_float32_rounds_to_0_turns_untouched_parameters_nan():
    """Why --adam_eps has a floor: below float32's range the update of a zero gradient is 0/0."""
    for eps, nan_where_zero in ((tg.MIN_ADAM_EPS, False), (1e-300, True)):
        p, grad = torch.ones(4), torch.tensor([0.0, 1.0, 0.0, 2.0])
        tg.adam_update(p, grad, torch.zeros(4), torch.zeros(4), torch.tensor(1.0), torch.tensor(0.01),
                       torch.tensor(0.0), 0.9, 0.95, eps)
        assert torch.isnan(p).tolist() == [nan_where_zero, False, nan_where_zero, False]


@pytest.mark.parametrize("world_size", [3, 5, 6, 16])
def test_world_size_must_divide_8(world_size):
    with pytest.raises(tg.UsageError, match=f"world size {world_size} does not divide 8"):
        tg.check_world_size(world_size)


@pytest.mark.parametrize("name,value", [("WORLD_SIZE", "abc"), ("RANK", "x"), ("LOCAL_RANK", "-1")])
def test_launch_environment_must_be_numbers(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(tg.UsageError, match=f"^{name}='{value}' is not a whole number: launch with torchrun, or unset"):
        tg.launch_environment()


@pytest.mark.parametrize("env,message", [(dict(RANK="5", WORLD_SIZE="2"), "RANK=5 is not below WORLD_SIZE=2"),
                                         (dict(RANK="1"), "RANK=1 is not below WORLD_SIZE=1"),
                                         (dict(LOCAL_RANK="9", WORLD_SIZE="8"),
                                          "LOCAL_RANK=9 is not below WORLD_SIZE=8")])
def test_ranks_must_lie_below_the_world_size(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(tg.UsageError, match=f"^{message}: launch with torchrun, or unset them"):
        tg.launch_environment()


@pytest.mark.parametrize("setup,message", [
    (lambda: open("logs", "w").close(), "logs is not a folder"),
    (lambda: os.symlink("nowhere", "logs"), "logs is not a folder"),
    (lambda: (os.makedirs("logs"), open("logs/r_rank0.pt", "w").close()), r"logs/r_rank0.pt exists \(an earlier run's"),
])
def test_outputs_are_checked_before_the_run(small_data, tmp_path, monkeypatch, setup, message):
    monkeypatch.chdir(tmp_path)
    setup()
    with pytest.raises(tg.UsageError, match=f"^{message}"):
        tg.main(small_data + ["--run_id", "r", "--save_checkpoint", "--check"])
    if os.path.isdir("logs"):  # without --save_checkpoint the checkpoint's name is free
        tg.main(small_data + ["--run_id", "r", "--check"])


def test_the_log_is_created_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tg.Logger("r", master=True)
    with pytest.raises(tg.UsageError, match="^logs/r.txt exists: another run with this --run_id started meanwhile"):
        tg.Logger("r", master=True)


def test_check_refuses_fa4_where_it_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as on a machine without flash-attn-4
    with pytest.raises(tg.UsageError, match=r"^--attention fa4 needs FlashAttention 4 .*, and it does not import here"):
        tg.check_fa4_installed("fa4")
    tg.check_fa4_installed("auto")  # auto falls back to PyTorch's attention


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Synthetic shards for a 3 + 0 step schedule (about 0.8M tokens) and 2,097,152 val tokens."""
    sys.path.insert(0, os.path.join(ROOT, "data"))
    import synthetic
    root = tmp_path_factory.mktemp("small_data")
    synthetic.main(["--out", str(root), "--train_shards", "2", "--shard_tokens", "1000000",
                    "--val_tokens", str(tg.VAL_BATCH_TOKENS + 1)])
    return ["--train_files", str(root / "fineweb_train_*.bin"), "--val_files", str(root / "fineweb_val_*.bin"),
            "--val_tokens", str(tg.VAL_BATCH_TOKENS), "--num_scheduled_iterations", "3",
            "--num_extension_iterations", "0"]


def test_check_prints_the_plan(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tg.main(small_data + ["--check"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "plan: 3 steps, world size 1 (gradient accumulation 8)"
    assert out[1] == "  stage 1: steps 0-0, 131,072 tokens/step, documents cut at 896, windows 128/384"
    assert out[3] == "  stage 3: steps 2-2, 393,216 tokens/step, documents cut at 2048, windows 640/1408"
    assert out[4].startswith("  train: 1 of the 2 shard(s) of ") and "786,456 tokens drawn" in out[4]
    assert out[5].startswith("  val: 2,097,152 + 1 tokens from 1 shard(s)")
    assert out[6].startswith("pre-flight checks passed in ") and not os.path.exists("logs")


def test_a_used_run_id_is_refused(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("logs")
    open(os.path.join("logs", "taken.txt"), "w").close()
    with pytest.raises(tg.UsageError, match=r"^logs/taken.txt exists \(an earlier run's, finished or failed\): "
                                            "each run writes its own files, so choose another --run_id"):
        tg.main(small_data + ["--run_id", "taken", "--check"])


def run_script(args, cwd, stdout=None, program=None, environment=None, **env):
    """train_gpt.py in a process of its own, or program, which can import it; its output is captured
    unless stdout is given. It runs in environment (by default this process's) with env added."""
    script = os.path.join(ROOT, "train_gpt.py")
    # a program imports as the script does: from ROOT, not from the working directory, whose folders (a
    # test's Inductor cache names its subfolders by two characters: "z3" once) would shadow modules
    command = ["-c", f"import sys\nsys.path[:] = [{ROOT!r}, *filter(None, sys.path)]\n{program}"] if program \
        else [script]
    return subprocess.run([sys.executable, *command, *args], stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=cwd, env={**(environment or os.environ), **env})


IMPORT_PROBE = """
import json, os, torch, torch._dynamo.config, torch._functorch.config, torch._inductor.config
from torch._inductor.choices import InductorChoices
os.environ.pop("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", None)  # a user's own choice: configure_torch keeps it
def settings():
    return (dict(os.environ), torch._dynamo.config.get_config_copy(), torch._functorch.config.get_config_copy(),
            torch._inductor.config.get_config_copy(), torch.compiler.config.get_config_copy(),
            InductorChoices.should_use_persistent_reduction)
def changed(before, after):
    names = ("environment", "dynamo", "functorch", "inductor", "compiler", "inductor choices")
    return [name for name, a, b in zip(names, before, after) if a != b]
before = settings()
import train_gpt
imported = settings()
train_gpt.configure_torch()
configured = settings()
train_gpt.configure_torch()  # again: the same settings, the choice wrapped once
print(json.dumps([changed(before, imported), changed(imported, configured), changed(configured, settings()),
                  InductorChoices.should_use_persistent_reduction.default is before[-1]]))
"""


def test_the_table_of_contents_is_true():
    """Every section the module docstring lists has its header, in that order, and every name listed
    under a section is defined inside it."""
    lines = open(tg.__file__).read().splitlines()
    headers = [i + 1 for i, line in enumerate(lines[:-1]) if line == "# " + "-" * 94]
    contents = tg.__doc__.split("with where to start reading each:\n")[1].strip().splitlines()
    sections = [line.split()[0] for line in contents]
    assert [lines[i].lstrip("# ").split(":")[0] for i in headers] == sections
    for line, start, end in zip(contents, headers, headers[1:] + [len(lines)]):
        for name in line.replace(",", " ").split()[1:]:
            where = [i for i, text in enumerate(lines) if re.match(rf"(def |class ){name}\b|{name} = ", text)]
            assert len(where) == 1 and start < where[0] < end, (name, where, start, end)


def test_importing_changes_no_setting(environment_before_import):
    """Importing the script leaves the environment and torch's compiler settings alone: main and the
    compile workers make them, through configure_torch()."""
    out = run_script([], ROOT, program=IMPORT_PROBE, environment=environment_before_import)
    assert out.returncode == 0, out.stderr[-3000:]
    on_import, on_configure, on_configure_again, wrapped_once = json.loads(out.stdout.splitlines()[-1])
    assert on_import == [] and on_configure == ["environment", "dynamo", "functorch", "compiler", "inductor choices"]
    assert on_configure_again == ["inductor choices"] and wrapped_once  # a new wrapper of the same default


def test_script_errors_are_one_line(small_data, tmp_path):
    """From the command line: exit code 1 and one line on stderr, no traceback; --check exits 0."""
    cases = [([], dict(WORLD_SIZE="3"), "world size 3 does not divide 8: launch with --nproc_per_node 1, 2, 4 or 8"),
             (["--nope"], {}, "unrecognized arguments: --nope (python train_gpt.py --help lists the flags)"),
             ([], dict(RANK="x"), "RANK='x' is not a whole number: launch with torchrun, or unset it"),
             ([], dict(WORLD_SIZE="\u00b2"), "WORLD_SIZE='\u00b2' is not a whole number"),
             # no torchrun: no rank 0 to speak
             (replaced(small_data, "--val_tokens", "7"), dict(RANK="1", WORLD_SIZE="2"),
              "--val_tokens must be a positive multiple"),
             (replaced(small_data, "--num_scheduled_iterations", "7"), {},
              f"{small_data[1]!r} runs out at step 6 of 7: its 2 shard(s) hold 2,000,000 tokens. Add shards"),
             # a schedule past what the data can hold at all is refused before the walk
             (replaced(small_data, "--num_scheduled_iterations", "1000000000"), {},
              f"{small_data[1]!r} holds 2,000,000 tokens, and the schedule's 1,000,000,000 steps draw at least "),
             (small_data + ["--train_files", "x/*.bin"], {}, "--train_files is given twice: give each flag once"),
             (small_data + ["--train-files", "x/*.bin"], {}, "--train_files is given twice"),
             (small_data, dict(WORLD_SIZE="8"), "WORLD_SIZE=8 without MASTER_ADDR and MASTER_PORT: processes find "
                                                "each other through torchrun"),
]
    if not GPU:
        cases.append((small_data, {}, "no CUDA GPU found: this script trains on NVIDIA GPUs (H100 / H200); "
                                      "--check validates the data without one"))
    for args, env, message in cases:
        out = run_script(args, tmp_path, **env)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"error: {message}"), out.stderr
    out = run_script(replaced(small_data, "--val_tokens", "7"), tmp_path, RANK="1", WORLD_SIZE="2",
                     TORCHELASTIC_RUN_ID="x")
    assert out.returncode == 1 and out.stderr == "", "under torchrun rank 0 speaks for the others"
    out = run_script(small_data + ["--check"], tmp_path)
    assert out.returncode == 0 and out.stderr == "" and "pre-flight checks passed" in out.stdout
    if os.path.exists("/dev/full"):  # a disk that is full
        with open("/dev/full", "w") as full:
            out = run_script(small_data + ["--check"], tmp_path, stdout=full)
        assert out.returncode == 1 and out.stderr == ("error: cannot write to the standard output (No space left on "
                                                      "device)\n"), out.stderr


@pytest.mark.skipif(GPU, reason="the run would go on to train")
@pytest.mark.parametrize("threads", [None, "abc"])
def test_a_run_takes_one_host_thread_unless_told_a_count(small_data, threads, tmp_path, monkeypatch):
    """As under torchrun; an OMP_NUM_THREADS that is no count (OpenMP ignores it, saying so) counts as unset."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if threads:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(tg.UsageError, match="^no CUDA GPU found"):
            tg.main(small_data + ["--run_id", f"threads{threads}"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_plan_for_several_processes_notes_the_missing_torchrun(small_data, tmp_path):
    out = run_script(small_data + ["--check"], tmp_path, WORLD_SIZE="8")
    assert out.returncode == 0 and out.stdout.splitlines()[-1].startswith("note: WORLD_SIZE=8 without MASTER_ADDR")
    out = run_script(small_data + ["--check"], tmp_path, WORLD_SIZE="8", MASTER_ADDR="x", MASTER_PORT="1")
    assert out.returncode == 0 and "note:" not in out.stdout


def test_check_with_the_standard_output_closed_is_one_line(small_data, tmp_path):
    script = " ".join(map(shlex.quote, [sys.executable, os.path.join(ROOT, "train_gpt.py"), *small_data, "--check"]))
    out = subprocess.run(["bash", "-c", f"{script} >&-"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1 and out.stderr == ("error: the standard output is closed: --check prints the plan "
                                                  "there; give it a file or a pipe\n"), out.stderr


def test_ctrl_c_is_one_line(small_data, tmp_path):
    """Ctrl-C during the pre-flight (here: as it starts) ends in one line and exit code 130."""
    program = ("import os, signal, time, train_gpt\n"
               "train_gpt.preflight = lambda *_: (os.kill(os.getpid(), signal.SIGINT), time.sleep(10))\n"
               "train_gpt.command_line()")
    out = run_script(small_data + ["--check"], tmp_path, program=program)
    assert out.returncode == 130 and out.stderr == "error: interrupted\n", out.stderr


@pytest.mark.parametrize("layout", ["a folder named with glob characters", "a pattern starting with ~"])
def test_patterns_find_the_files_a_user_means(small_data, tmp_path, layout):
    folder = tmp_path / ("run[1]" if "glob" in layout else "home/data")
    shutil.copytree(os.path.dirname(small_data[1]), folder)
    pattern = (str(folder) if "glob" in layout else "~/data") + "/fineweb_{}_*.bin"
    args = replaced(small_data, "--train_files", pattern.format("train"), "--val_files", pattern.format("val"))
    args.append("--check")
    out = run_script(args, tmp_path, HOME=str(tmp_path / "home"))
    assert out.returncode == 0 and "pre-flight checks passed" in out.stdout, out.stderr


def test_a_missing_folder_is_named_with_where_relative_patterns_start(small_data, tmp_path):
    out = run_script(["--train_files", "data/synthetic/fineweb_train_*.bin", "--check"], tmp_path)
    assert out.returncode == 1 and out.stderr == (f"error: No such folder: data/synthetic, in the current folder "
                                                  f"{tmp_path}, where relative patterns start\n"), out.stderr


def test_outputs_need_a_writable_folder_and_room(small_data, tmp_path, monkeypatch):
    """The folder's permissions and free space as the operating system reports them (here: stand-ins for a
    read-only and a nearly full disk, which a test cannot make)."""
    monkeypatch.chdir(tmp_path)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and not mode & os.W_OK)
    with pytest.raises(tg.UsageError, match=f"^cannot write into {tmp_path}: runs write their logs into logs/"):
        tg.main(small_data + ["--check"])
    monkeypatch.setattr(os, "access", access)
    free = 3 * 2**30  # room for a log, not for a checkpoint (about 5 GiB with the optimizer's state)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, 0, free))
    tg.main(small_data + ["--check"])
    with pytest.raises(tg.UsageError, match=r"has 3,072 MiB free, too little for the log and [0-9.]+ GiB of checkp"):
        tg.main(small_data + ["--check", "--save_checkpoint", "--run_id", "c"])


def test_checkpoint_bytes_count_the_model_and_every_optimizer_shard():
    model = tg.GPT(device="meta")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    one = tg.checkpoint_bytes(1)
    assert params < one < params + 4 * sum(p.numel() * 4 for p in model.parameters())  # fp32 moments at most
    eight = tg.checkpoint_bytes(8)  # eight models, the optimizer state split eight ways (and the replicated groups)
    assert 8 * params + (one - params) <= eight < 8 * params + 1.01 * (one - params)


def test_failed_writes_leave_no_file(tmp_path):
    """A disk that fills (here: a file size limit, which makes writes fail as a full disk does)."""
    program = ("import resource, signal, os, torch, train_gpt as tg\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))\n"
               "log = tg.Logger('r', master=True)\n"
               "for attempt in (lambda: log.header(), lambda: tg.save_whole(torch.zeros(10**6), 'logs/r_rank0.pt')):\n"
               "    try:\n"
               "        attempt()\n"
               "    except tg.UsageError as e:\n"
               "        print(e)\n"
               "print(sorted(os.listdir('logs')))")
    out = run_script([], tmp_path, program=program)
    assert out.returncode == 0 and out.stdout.splitlines() == [
        "cannot write logs/r.txt (File too large): free space on its disk",
        "cannot save logs/r_rank0.pt (the write failed): free space on its disk", "[]"], out.stdout + out.stderr


def test_an_old_torch_is_refused_in_one_line(small_data, tmp_path):
    """Before any torch setting: an older release would fail inside its own code instead."""
    for version in ("2.11.0+cu130", "2.13.0", "2.12.0.dev20260301+cu130", "3.0.0"):
        tg.check_torch_version(version)
    for version in ("2.10.1+cu128", "1.13.1"):
        with pytest.raises(tg.UsageError, match=rf"^PyTorch {re.escape(version)} is too old: train_gpt.py needs "
                                                r"2\.11 or newer \(the README's install"):
            tg.check_torch_version(version)
    program = ("import runpy, torch\ntorch.__version__ = '2.10.1+cu128'  # what that torch reports\n"
               f"runpy.run_path({os.path.join(ROOT, 'train_gpt.py')!r}, run_name='__main__')")
    out = run_script(small_data + ["--check"], tmp_path, program=program)
    assert out.returncode == 1 and out.stderr.startswith("error: PyTorch 2.10.1+cu128 is too old"), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr


def test_profile_needs_a_stage_with_six_steps(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tg.UsageError, match=r"^argument --stage: invalid choice: 4 \(choose from 1, 2, 3\) "
                                            r"\(python profile_gpt.py --help lists the flags\)$"):
        profile_gpt.main(["--stage", "4"])
    with pytest.raises(tg.UsageError, match=r"^--stage 2 runs 6 steps of stage 2, which has 5 here: raise "):
        profile_gpt.main(replaced(small_data, "--num_scheduled_iterations", "15") + ["--stage", "2", "--check",
                                                                                     "arguments"])
    profile_gpt.main(replaced(small_data, "--num_scheduled_iterations", "18") + ["--stage", "3", "--check", "arguments"])
    assert capsys.readouterr().out == "arguments checked for world size 1\n"


def test_profile_refuses_what_it_cannot_do(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tg.UsageError, match="^--save_checkpoint saves the model at the end of training, and "
                                            "profile_gpt.py does not train: drop it$"):
        profile_gpt.main(small_data + ["--stage", "1", "--save_checkpoint"])
    with pytest.raises(tg.UsageError, match="^--stage is given twice: give each flag once$"):
        profile_gpt.main(small_data + ["--stage", "1", "--stage", "2"])
    with pytest.raises(tg.UsageError, match="^the following arguments are required: --stage"):
        profile_gpt.main(small_data)
    with pytest.raises(tg.UsageError, match=r"^unrecognized arguments: --stages 1 \(python train_gpt.py --help"):
        profile_gpt.main(small_data + ["--stage", "1", "--stages", "1"])


def test_profile_help_and_errors_from_the_command_line(small_data, tmp_path):
    profiler = os.path.join(ROOT, "profile_gpt.py")
    out = subprocess.run([sys.executable, profiler, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "--stage {1,2,3}" in out.stdout and "python train_gpt.py --help" in out.stdout
    out = subprocess.run([sys.executable, profiler, *small_data, "--stage", "1"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 1 and out.stderr == ("error: --stage 1 runs 6 steps of stage 1, which has 1 here: raise "
                                                  "--num_scheduled_iterations\n"), out.stderr


def test_profile_checks_its_trace_files(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "p_rank0_trace.json").write_text("{}")
    with pytest.raises(tg.UsageError, match=r"^logs/p_rank0_trace.json exists \(an earlier run's"):
        profile_gpt.main(replaced(small_data, "--num_scheduled_iterations", "18") + ["--stage", "1", "--run_id", "p",
                                                                                     "--check", "arguments"])


def test_kernel_categories():
    cases = [("ncclDevKernel_AllReduce_Sum_f32", True, "NCCL"),
             ("triton_poi_fused_lerp_0", True, "optimizer"),
             ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90", False, "attention"),
             ("_linear_relu_square_kernel", False, "linear+ReLU^2 kernel"),
             ("kernel_cutlass_kernel_quackepiloguefrontendGemmMod_linear_relu_square_backward_ee7df39f5b2e5bef__til",
              False, "linear+ReLU^2 kernel"),
             ("_softcap_ce_kernel", False, "cross-entropy kernels"),
             ("_qkv_heads_backward_kernel", False, "q/k norm+rotary kernels"),
             ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n", False, "FP8 GEMMs"),
             ("nvjet_sm90_rqsss_144x128_128x6_1x2_h_bz_coopA_algo2_TNN", False, "FP8 GEMMs"),
             ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_NNN", False, "bf16 GEMMs"),
             ("triton_red_fused__to_copy_add_mean_3", False, "Inductor kernels"),
             ("triton_poi_fused_transpose_view_5", False, "Inductor kernels"),
             ("_transpose_kernel", False, "transposes"),
             ("Memcpy HtoD (Pinned -> Device)", False, "copies and fills"),
             ("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>", False, "eager PyTorch kernels"),
             ("_embedding_grad_kernel", False, "embedding gradients"),
             ("void cub::DeviceRadixSortOnesweepKernel", False, "embedding gradients"),
             ("void at::native::bitonicSortKVInPlace", False, "embedding gradients"),
             ("void at::native::reduce_kernel", False, "eager PyTorch kernels"),
             ("void cudnn::bn_fw_tr_1C11_kernel", False, "other")]
    assert [profile_gpt.kernel_category(name, in_optimizer) for name, in_optimizer, _ in cases] == [c[2] for c in cases]


def test_the_profile_plans_its_prefetch_at_the_next_stage_when_the_stage_ends():
    """--stage 2 on a stage of exactly six steps: after the last, profile_stage prefetches the first
    micro-batches of stage 3, at stage 3's larger shapes, and the pre-flight walks that draw as such."""
    what, stages = profile_gpt.stage_draws(2, tg.Schedule(18, 0))[-1]
    assert what == " of the profile of stage 2"
    assert [stage.name for stage in stages] == ["stage 2"] * 6 + ["stage 3"]


def test_projected_record_time_sums_the_record_schedule():
    # the record's stages have 483, 484, 483 and 40 steps
    line = profile_gpt.projected_record_time({0: 20.0, 1: 40.0, 2: 60.0, 3: 61.0})
    assert "60.4 s before communication" in line and "88.8 s" in line and "73.8 s" in line
    # a run without an extension: the extension at stage 3's rate
    assert "60.4 s" in profile_gpt.projected_record_time({0: 20.0, 1: 40.0, 2: 60.0})
    assert "66.8 s" in profile_gpt.projected_record_time({0: 30.0, 1: 40.0, 2: 60.0, 3: 100.0})


def test_profile_table_counts_overlaps_once_and_the_idle_time():
    kernels = [("nvjet_tst_NNN", 0, 400), ("triton_poi_fused_0", 300, 500),  # two streams overlap by 100
               ("_softcap_ce_kernel", 600, 700), ("triton_poi_fused_lerp", 800, 1000)]
    rows = {row[0]: row[1:] for row in profile_gpt.profile_table(kernels, [(790, 1000)], span=1000, steps=2)}
    assert rows["bf16 GEMMs"] == (0.2, 0.4, 0.5) and rows["Inductor kernels"] == (0.1, 0.2, 0.5)
    assert rows["optimizer"] == (0.1, 0.2, 0.5) and rows["cross-entropy kernels"] == (0.05, 0.1, 0.5)
    assert rows["idle (no kernel running)"] == (0.1, 0.2, 0) and rows["step"] == (0.5, 1.0, 2)


def test_top_kernels_sum_each_name_per_step():
    kernels = [("nvjet_tst_NNN", 0, 400), ("triton_red_fused_1", 400, 460), ("triton_red_fused_1", 500, 540),
               ("nvjet_tst_NNN", 600, 1000), ("triton_poi_fused_0", 1000, 1010)]
    assert profile_gpt.top_kernels(kernels, steps=2, n=2) == [("nvjet_tst_NNN", 0.4, 1.0, 400.0),
                                                     ("triton_red_fused_1", 0.05, 1.0, 50.0)]


def test_the_warm_cache_marker_tells_a_runs_graphs_from_the_profilers(monkeypatch):
    """python train_gpt.py traces its graphs in __main__, profile_gpt.py in the module train_gpt: their
    cache entries differ, so caches warmed by one are cold for the other."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    as_main = runpy.run_path(tg.__file__, run_name="__main_but_not_run__")["warm_cache_marker"]
    assert as_main("torch", 1) != tg.warm_cache_marker("torch", 1) == tg.warm_cache_marker("torch", 1)


def test_describe_compile_splits_a_compile():
    step_time = profile_gpt.compile_timer()
    fresh = float(np.random.default_rng().integers(1, 2**30))  # a constant no cache has seen: a cold compile
    torch.compile(lambda x: (x.sin() * fresh).sum(), dynamic=False, fullgraph=True)(torch.randn(8, 8))
    line = step_time()
    m = re.fullmatch(r"([\d.]+)s \(dynamo ([\d.]+), aot ([\d.]+), inductor ([\d.]+), triton ([\d.]+), other "
                     r"(-?[\d.]+); ([\d.]+|nan) CPUs busy; cache hits: \d+ Inductor, \d+ AOT, \d+ Inductor misses, "
                     r"\d+ AOT bypasses\)", line)
    assert m, line
    wall, dynamo, aot, inductor, triton, other = map(float, m.groups()[:6])
    assert wall > 0 and dynamo > 0 and inductor > 0
    assert abs(dynamo + aot + inductor + triton + other - wall) <= 0.3  # six values rounded to 0.1


def test_graphs_with_autograd_functions_reach_aotautograd_cache(tmp_path):
    """With the script's settings (configure_torch) a graph holding a custom autograd Function, as the
    model's do, is kept by AOTAutograd's cache: a second process loads it instead of tracing it again."""
    program = """if True:
        import torch
        import train_gpt
        from torch._dynamo.utils import counters
        train_gpt.configure_torch()

        class Double(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return 2 * x

            @staticmethod
            def backward(ctx, grad):
                return 2 * grad

        step = torch.compile(lambda x: Double.apply(x).sin().sum(), fullgraph=True, dynamic=False)
        step(torch.randn(8, requires_grad=True)).backward()
        print(counters["aot_autograd"]["autograd_cache_hit"], counters["aot_autograd"]["autograd_cache_bypass"])
    """
    runs = [run_script([], tmp_path, program=program, TORCHINDUCTOR_CACHE_DIR=str(tmp_path)) for _ in range(2)]
    assert [run.stdout.split() for run in runs] == [["0", "0"], ["1", "0"]], [run.stderr[-2000:] for run in runs]


def test_graphs_compiled_without_the_script_settings_are_not_loaded(tmp_path):
    """Inductor's cache keys do not see configure_torch's choice of persistent reductions, so its tag
    must: a graph cached by a process without the script's settings is compiled again under them,
    and then loaded by the next process that has them."""
    program = """if True:
        import torch
        import train_gpt
        from torch._dynamo.utils import counters
        if sys.argv[1] == "configured":
            train_gpt.configure_torch()
        torch.compile(lambda x: train_gpt.norm(x).sum(), dynamic=False)(torch.randn(4, 8))
        print(counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"])
    """
    hits = []
    for setting in ("default", "configured", "configured"):
        run = run_script([setting], tmp_path, program=program, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
        assert run.returncode == 0, run.stderr[-2000:]
        hits.append(int(run.stdout.split()[-1]))
    assert hits[:2] == [0, 0] and hits[2] > 0, hits  # loaded only by a process of the same settings


NORM_BACKWARD_PROBE = """if True:
    import json, re, sys, torch
    import train_gpt as tg
    from train_test import fineweb_like_batch
    from torch._inductor.utils import run_and_get_code
    if sys.argv[1] == "configured":
        tg.configure_torch()
    torch.manual_seed(0)
    model, compiled = tg.build_model(tg.Hyperparameters(attention="torch"), "cuda")
    with torch.no_grad():  # the zero-initialized projections would zero the gates' gradients
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    stage = tg.STAGES[0]
    batch = fineweb_like_batch(stage.batch_tokens // tg.SLOTS_PER_STEP, stage.max_seq_len)
    mtp = torch.tensor(stage.mtp_start, device="cuda")
    _, code = run_and_get_code(lambda: tg.run_training_graph(compiled, batch, stage, mtp).backward())
    torch.save({name: p.grad for name, p in model.named_parameters()}, sys.argv[2])
    looped = re.findall(r"def (triton_red_\\w+rms_norm_backward\\w*)\\(.*\\n(?:.*\\n)*?\\s+r0_numel = (\\d+)\\n",
                        "".join(code))
    print(json.dumps(sorted({(name, int(row)) for name, row in looped})))  # the looped norm backwards, row length
"""


@needs_gpu
def test_gated_norm_backwards_hold_their_rows_in_registers(tmp_path):
    """The model's norm backwards that also add a gate's gradient (the gates read the normed input's
    first GATE_DIM columns) loop over their 768-wide rows by default, two passes over each, and hold
    them in registers with the script's settings (configure_torch); the gradients stay the same."""
    looped_rows, grads = {}, {}
    for setting in ("default", "configured"):
        grads_file = tmp_path / f"{setting}.pt"
        out = run_script([setting, str(grads_file)], tmp_path, program=NORM_BACKWARD_PROBE,
                         TORCHINDUCTOR_CACHE_DIR=str(tmp_path / setting))  # compile, not load
        assert out.returncode == 0, out.stderr[-3000:]
        looped_rows[setting] = [(name, row) for name, row in json.loads(out.stdout.splitlines()[-1])
                                if row <= tg.PERSISTENT_ROW_MAX]
        grads[setting] = torch.load(grads_file)
    assert looped_rows["default"] and not looped_rows["configured"], looped_rows
    for name, ref in grads["default"].items():  # bf16 sums in another order
        assert (grads["configured"][name] - ref).float().norm() <= 2e-2 * ref.float().norm(), name


def test_compile_worker_failures_are_one_line():
    """A worker that cannot compile (no GPU here, or a bad device index on a GPU machine) reports why
    in one line instead of a traceback, and one silent past the timeout is stopped; the main process
    then compiles the graph itself."""
    import multiprocessing
    no_such_gpu = tg.Run(tg.Hyperparameters(), 1, 0, torch.device("cuda", torch.cuda.device_count() + 5))
    worker = tg.CompileWorker(multiprocessing.get_context("spawn"), "a graph", 1, no_such_gpu, tg.STAGES[0])
    result = worker.result()
    assert isinstance(result, str) and "\n" not in result and result.split(":")[0].endswith("Error"), result
    assert not worker.process.is_alive()
    slow = tg.CompileWorker(multiprocessing.get_context("spawn"), "a graph", 1,
                            tg.Run(tg.Hyperparameters(), 1, 0, torch.device("cuda", 0)), tg.STAGES[0])
    assert slow.result(timeout=0.01) == "no result after 0.01 s" and not slow.process.is_alive()


def test_run_sh_skips_the_download_for_other_data(small_data, tmp_path):
    """run.sh with --train_files starts torchrun at once (here 2 processes on the CPU, --check): the
    FineWeb download, which cannot succeed on a machine without the Hub, is not attempted."""
    script = os.path.join(ROOT, "run.sh")
    out = subprocess.run(["bash", script, *small_data, "--check"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "NPROC": "2", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("plan: 3 steps, world size 2 (gradient accumulation 4)\n")
    assert out.stdout.count("pre-flight checks passed") == 1 and "FineWeb shards" not in out.stderr


@pytest.mark.parametrize("nproc,args,message", [
    ("0", [], "NPROC=0: train_gpt.py runs on 1, 2, 4 or 8 GPUs"),
    ("abc", [], "NPROC=abc: train_gpt.py runs on 1, 2, 4 or 8 GPUs"),
    ("3", [], "NPROC=3: train_gpt.py runs on 1, 2, 4 or 8 GPUs"),
    ("2", ["--val_tokens", "7"], "--val_tokens must be a positive multiple of the val batch"),
])
def test_run_sh_errors_are_one_line(small_data, tmp_path, nproc, args, message):
    """Before torchrun: its report of a failed child would bury the message."""
    script = os.path.join(ROOT, "run.sh")
    out = subprocess.run(["bash", script, *replaced(small_data, *args)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "NPROC": nproc, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and out.stdout == "" and out.stderr.startswith(f"error: {message}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def run_sh(args, cwd, nproc="1"):
    return subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "NPROC": nproc, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})


def test_run_sh_checks_the_arguments_before_the_download(tmp_path):
    out = run_sh(["--val_tokns", "2097152"], tmp_path)  # FineWeb's default patterns: it would download first
    assert out.returncode == 1 and out.stderr == ("error: unrecognized arguments: --val_tokns 2097152 (python "
                                                  "train_gpt.py --help lists the flags)\n"), out.stderr


@pytest.mark.skipif(GPU, reason="needs a machine with fewer GPUs than NPROC: this one has one")
def test_run_sh_counts_the_gpus_before_the_download(tmp_path):
    out = run_sh([], tmp_path)
    assert out.returncode == 1 and out.stderr == ("error: NPROC=1, but 0 CUDA GPU(s) are in view (CUDA_VISIBLE_DEVICES)"
                                                  ": lower NPROC, or run on a machine with 1\n"), out.stderr


def test_run_sh_reads_relative_patterns_from_the_users_folder(small_data, tmp_path):
    shutil.copytree(os.path.dirname(small_data[1]), tmp_path / "mine")
    args = replaced(small_data, "--train_files", "mine/fineweb_train_*.bin", "--val_files", "mine/fineweb_val_*.bin")
    out = run_sh(args + ["--check"], tmp_path)
    assert out.returncode == 0 and "pre-flight checks passed" in out.stdout, out.stderr


def test_constraints_pin_every_requirement_within_its_range():
    """constraints.txt is the tested set: every package the requirement files name has a pin there,
    and the pin satisfies the range."""
    from packaging.requirements import Requirement
    def lines(name):
        with open(os.path.join(ROOT, name)) as f:
            return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    pins = {}
    for line in lines("constraints.txt"):
        name, version = line.split("==")
        pins[name.lower().replace("_", "-")] = version
    for name in ("requirements.txt", "requirements-test.txt"):
        for line in lines(name):
            if line.startswith("-r "):
                continue
            requirement = Requirement(line)
            pin = pins.get(requirement.name.lower().replace("_", "-"))
            assert pin is not None and requirement.specifier.contains(pin, prereleases=True), (name, line, pin)


# --- GPU -----------------------------------------------------------------------------------------

def fineweb_like_batch(local_tokens, max_seq_len, seed=0):
    """A micro-batch as the loader makes it: documents of log-normal length (median ~400), cut at
    max_seq_len, random tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(np.log(400), 1.0, local_tokens // 32).astype(int) + 32, max_seq_len)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    starts = starts[starts <= local_tokens]
    buf = rng.integers(0, tg.GPT2_VOCAB_SIZE, local_tokens + 1).astype(np.int32)
    buf[starts[starts < local_tokens + 1]] = tg.BOS_ID
    return tg.micro_batch(buf, starts[starts < local_tokens], "cuda", "test")


@pytest.fixture
def configured_torch():
    """main's process-wide settings (configure_torch), for a test that compiles in this process as
    training does: otherwise it would pass or fail by whether an earlier test ran main (Dynamo's
    recompile limit, for one)."""
    tg.configure_torch()


def attention_unavailable(backend):
    """None if the attention backend runs on this GPU, else why not."""
    try:
        tg.attention_backend(backend, "cuda")
    except tg.UsageError as e:
        return str(e)
    return None


@needs_gpu
@pytest.mark.parametrize("stage,backend", [(0, "fa4"), (2, "fa4"), (2, "torch")])
def test_full_model_compiles_without_graph_breaks(stage, backend, configured_torch):
    problem = attention_unavailable(backend)
    if problem:
        pytest.skip(problem)
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    # as training compiles it: the trunk under fullgraph=True (raises on a graph break), the lookups outside
    model, compiled = tg.build_model(tg.Hyperparameters(attention=backend), "cuda")
    st = tg.STAGES[stage]
    batch = fineweb_like_batch(st.batch_tokens // 8, st.max_seq_len)
    mtp = torch.tensor(st.mtp_start, device="cuda")
    loss = tg.run_training_graph(compiled, batch, st, mtp)
    (loss / 8).backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        val = fineweb_like_batch(262144, 262144, seed=1)
        val_loss = tg.run_eval_graph(compiled, val, st.windows)
    assert abs(val_loss.item() - math.log(50304)) < 0.5
    print(f"stage {stage + 1}, attention {backend}: peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


@needs_gpu
def test_parallel_compile_gives_the_same_losses(small_data, tmp_path):
    """Four steps whose later graphs worker processes compiled log the losses of four steps compiled
    by the main process alone (to the run-to-run noise of the attention backward's atomics)."""
    losses = {}
    # the run and its three workers need most of an 80 GB GPU: this process gives back what earlier tests cached
    torch.cuda.empty_cache()
    for parallel in ("on", "off"):
        out = run_script(replaced(small_data, "--num_extension_iterations", "1") +
                         ["--val_loss_every", "1", "--run_id", f"p{parallel}", "--parallel_compile", parallel],
                         tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert re.search(r"^linear\+ReLU² and attention projections: (quack|Triton and cuBLAS) \(", out.stdout,
                         re.MULTILINE)
        worker_lines = [line for line in out.stdout.splitlines() if "worker" in line]
        assert (("a worker compiled the training graph of 393,216 tokens/step" in out.stdout)
                == (parallel == "on")), worker_lines
        losses[parallel] = [float(x) for x in re.findall(r"^step:\d+/4 val_loss:(\S+)", out.stdout, re.MULTILINE)]
    assert len(losses["on"]) == 5 and np.allclose(losses["on"], losses["off"], rtol=0, atol=2e-3), losses


@needs_gpu
def test_cuda_graphs_give_the_losses_of_the_plain_step(small_data, tmp_path):
    """Four steps, one in each stage and the extension (every captured graph, every stage change),
    replayed as CUDA graphs, validate as the plain launches do (to the run-to-run noise of the
    attention backward's atomics); a loss blown up by the learning rate still stops the run."""
    losses = {}
    for graphs in ("true", "false"):
        out = run_script(replaced(small_data, "--num_extension_iterations", "1") +
                         ["--val_loss_every", "1", "--run_id", f"g{graphs}", "--cuda_graphs", graphs], tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert ("CUDA graphs: 4 captured" in out.stdout) == (graphs == "true"), out.stdout[-3000:]
        assert re.findall(r"^step:(\d+)/4 train_time", out.stdout, re.MULTILINE) == ["1", "2", "3", "4"]
        losses[graphs] = [float(x) for x in re.findall(r"^step:\d+/4 val_loss:(\S+)", out.stdout, re.MULTILINE)]
    assert len(losses["true"]) == 5 and np.allclose(losses["true"], losses["false"], rtol=0, atol=2e-3), losses
    assert len(set(losses["true"])) == 5, f"training must change the loss: {losses}"
    # check_arguments refuses so large a rate up front; this run lifts its cap to reach the stop in training
    lifted_cap = ("import sys, train_gpt\ntrain_gpt.MAX_LEARNING_RATE = float('inf')\ntry:\n    train_gpt.main()\n"
                  "except train_gpt.TrainingError as e:\n    sys.exit(f'error: {e}')")
    out = run_script(replaced(small_data, "--num_extension_iterations", "1") +
                     ["--muon_lr", "1e30", "--run_id", "blowup"], tmp_path, program=lifted_cap)
    assert out.returncode == 1 and re.match(r"error: the training loss is (nan|inf) at step [0-3]: stopping\. Lower "
                                            r"the learning rates", out.stderr), out.stderr[-3000:]


@needs_gpu
@pytest.mark.parametrize("backend", ["fa4", "torch"])
def test_one_compiled_graph_serves_every_window_and_scale(backend, configured_torch):
    """Windows and the YaRN scale are run-time inputs: new values compile nothing and change the result
    as they change the eager model's."""
    problem = attention_unavailable(backend)
    if problem:
        pytest.skip(problem)
    torch.manual_seed(0)
    model, compiled = tg.build_model(tg.Hyperparameters(attention=backend), "cuda")  # as training compiles it
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    val = fineweb_like_batch(262144, 2048, seed=2)
    losses = []
    with torch.no_grad():
        tg.run_eval_graph(compiled, val, (1, 3))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for windows, yarn in (((1, 3), None), ((6, 20), None), ((6, 20), (384, 2560))):
                if yarn:
                    model.rotary.yarn(*yarn)
                got = tg.run_eval_graph(compiled, val, windows).item()
                losses.append(got)
                assert got == pytest.approx(tg.run_eval_graph(model, val, windows).item(), rel=2e-3), (windows, yarn)
    assert len(set(losses)) == 3, f"each window and scale must change the loss: {losses}"


@needs_gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("window", [128, 640, 1408, 2560])  # short and long windows, the final validation's
@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
@pytest.mark.parametrize("backend", ["fa4", "torch"])
def test_attention_backend_matches_reference(backend, paired, window, compiled, configured_torch):
    """Gated output and dq, dk, dv, dgate of each backend against fp32 reference attention on the same
    bf16 inputs. The backward's lse - log(gate) in place of multiplying the gradient is checked here."""
    problem = attention_unavailable(backend)
    if problem:
        pytest.skip(problem)
    T, max_len = 4096, 2048
    batch = fineweb_like_batch(T, max_len, seed=window)
    scale = 2 if paired else 1  # paired layers: 3 heads at doubled positions
    cu, n, heads = batch.cu_seqlens * scale, T * scale, 6 // scale
    qkv = torch.randn(n, 3, heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # as the model's
    gate = torch.rand(n, heads, device="cuda").clamp(min=1e-3).to(torch.bfloat16).requires_grad_()  # sigmoid's range
    grad_out = torch.randn(n, heads, 128, device="cuda", dtype=torch.bfloat16)

    def run(qkv, gate):
        return tg.attention(*qkv.unbind(1), gate, cu, max_len * scale, torch.tensor(window, dtype=torch.int32),
                            torch.tensor(0.12, dtype=torch.float64), backend)
    out = (torch.compile(run, fullgraph=True, dynamic=False) if compiled else run)(qkv, gate)
    grad, grad_gate = torch.autograd.grad(out, (qkv, gate), grad_out)
    qkv_ref, gate_ref = qkv.detach().float().requires_grad_(), gate.detach().float().requires_grad_()
    ref = tg.reference_attention(*qkv_ref.unbind(1), cu, window, 0.12) * gate_ref[..., None]
    ref_grad, ref_grad_gate = torch.autograd.grad(ref, (qkv_ref, gate_ref), grad_out.float())
    pairs = [("out", out, ref), ("dgate", grad_gate, ref_grad_gate)]
    pairs += [(name, grad[:, i], ref_grad[:, i]) for i, name in enumerate(("dq", "dk", "dv"))]
    for name, got, want in pairs:
        assert torch.isfinite(got).all(), name
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2, name


@needs_gpu
def test_fp8_training_loss_is_close_to_the_bf16_eval_loss():
    torch.manual_seed(0)
    model = tg.GPT(device="cuda")
    with torch.no_grad():
        model.lm_head.mul_(20)  # non-trivial logits
    batch = fineweb_like_batch(16384, 896)
    with torch.no_grad():
        windows = tg.window_tensor((1, 3))
        train = model(*batch[:4], 896, windows, torch.ones(1, device="cuda")) / 16384
        val = model(*batch[:4], 896, windows)
    assert abs(train.item() - val.item()) / val.item() < 0.01
    assert abs(val.item() - math.log(50304)) > 0.05, "the logits must not be trivially uniform"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("sparse", [False, True])
def test_nccl_optimizer_steps_equal_the_single_process_result(sparse, tmp_path):
    out_dir = str(tmp_path)
    run_optimizer(0, 1, False, None, out_dir, "cuda")
    mp.spawn(run_optimizer, args=(2, sparse, _free_port(), out_dir, "cuda"), nprocs=2)
    single = torch.load(os.path.join(out_dir, "cuda_w1_dense_r0.pt"))
    for rank in range(2):
        params = torch.load(os.path.join(out_dir, f"cuda_w2_{'sparse' if sparse else 'dense'}_r{rank}.pt"))
        for name, ref in single.items():
            got = params[name]
            if name == "scalars":
                ref, got = ref[:tg.NUM_SCALARS], got[:tg.NUM_SCALARS]
            # Adam sums are exact; cuBLAS may order Polar Express's bf16 products differently per batch size
            assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4), f"{name} on rank {rank}"
