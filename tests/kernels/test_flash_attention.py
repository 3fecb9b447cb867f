"""The Triton FlashAttention-2 kernel against the float64 reference, output and all three gradients.

Without a GPU the kernel runs in Triton's interpreter (see conftest.py), so shapes stay tiny:
sequences up to 70 with 32-wide blocks still give several blocks, ragged last blocks and
causal diagonals that cut through blocks. Each test draws its own random inputs from a seed
named in its failure message (KERNEL_TEST_SEED=n shifts every seed, to explore).

Tolerance, per output: the kernel may be off the float64 reference by at most twice what an
fp32 reference is off once its result is rounded to the input's dtype, plus a small floor for
the one rounding the kernel adds on purpose (P and dS go to the tensor cores in the input dtype).
The yardstick computes S in fp32: a reference computed in bf16 would round every score (an
error of 1% in exp(S) at |S| = 3) and let a kernel with the same fault pass.
"""
import math
import os
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

from course_lib.kernels import flash_attention as fa  # noqa: E402
from course_lib.kernels.reference import attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}  # times max(1, |ref|)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _kernel_runs_here():
    if not (CUDA or fa.is_interpreted()):
        pytest.fail("no GPU, and the kernel is not interpreted: triton was imported before conftest.py "
                    "could set TRITON_INTERPRET=1; run pytest with TRITON_INTERPRET=1 in the environment")


@pytest.fixture
def seed(request):
    return zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("KERNEL_TEST_SEED", "0"))


def randn(shape, seed, dtype, layout="bhsd"):
    """A (B, H, L, D) tensor of N(0, 1), as a view of memory laid out in `layout` order:
    "bshd" after a linear projection and `transpose(1, 2)`, "bhdl" after a 1x1 convolution
    over H*W positions and `transpose(-1, -2)` (the UNet's attention block)."""
    g = torch.Generator().manual_seed(seed)
    b, h, l, d = shape
    if layout == "bshd":
        return torch.randn(b, l, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    if layout == "bhdl":
        return torch.randn(b, h, d, l, generator=g).to(DEVICE, dtype).transpose(2, 3)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def qkv(B, H, Lq, Lk, D, Dv=None, *, seed, dtype=torch.float32, layout="bhsd"):
    Dv = D if Dv is None else Dv
    return (randn((B, H, Lq, D), seed, dtype, layout), randn((B, H, Lk, D), seed + 1, dtype, layout),
            randn((B, H, Lk, Dv), seed + 2, dtype, layout), randn((B, H, Lq, Dv), seed + 3, dtype))


def run(fn, q, k, v, do, **kw):
    """fn's output and its gradients with respect to q, k, v for the output gradient do."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def check(q, k, v, do, *, seed, deterministic=True, **kw):
    """Assert the kernel's (o, dq, dk, dv) are as close to float64 as an fp32 reference rounded to q's dtype."""
    got = run(fa.flash_attention, q, k, v, do, fp32_precision="ieee", deterministic=deterministic, **kw)
    want = run(attention_reference, *(x.double() for x in (q, k, v, do)), **kw)
    lowp = [x.to(q.dtype) for x in run(attention_reference, *(x.float() for x in (q, k, v, do)), **kw)]
    for name, g, w, l in zip(("o", "dq", "dk", "dv"), got, want, lowp):
        assert g.shape == w.shape and g.dtype == q.dtype, f"{name}: got {g.dtype} {tuple(g.shape)}"
        err = (g.double() - w).abs().max().item()
        ref_err = (l.double() - w).abs().max().item()
        tol = 2 * ref_err + FLOOR[q.dtype] * max(1.0, w.abs().max().item())
        assert err <= tol, (f"{name} ({q.dtype}, seed {seed}, {kw}): max error {err:.3g} against float64, "
                            f"tolerance {tol:.3g} (the reference in {q.dtype} is off by {ref_err:.3g})")
    return got


# ---- dtypes, causal ----------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_self_attention(dtype, causal, seed):
    check(*qkv(2, 2, 70, 70, 64, seed=seed, dtype=dtype), causal=causal, seed=seed)


# ---- cross attention: Lq != Lk -----------------------------------------------------------------

@pytest.mark.parametrize("Lq, Lk, causal, dtype", [
    (48, 77, False, torch.bfloat16),   # image queries on 77 text tokens (Stable Diffusion 1.x cross attention)
    (77, 48, False, torch.float16),
    (29, 70, True, torch.float32),     # causal, aligned at the end: the last query sees every key
    (70, 29, True, torch.float16),     # Lq > Lk causal: the first 41 queries see no key and return 0
    (1, 70, True, torch.float32),      # one new query on a cache of 70 keys
    (70, 1, False, torch.bfloat16),
])
def test_cross_attention(Lq, Lk, causal, dtype, seed):
    o = check(*qkv(2, 2, Lq, Lk, 40, seed=seed, dtype=dtype), causal=causal, seed=seed)[0]
    if causal and Lq > Lk:
        assert torch.all(o[:, :, : Lq - Lk] == 0)


def test_glide_text_keys_joined_to_image_keys(seed):
    """GLIDE: every attention layer attends over [text tokens ; image tokens], text padded per caption."""
    B, H, n_text, n_img, D = 2, 2, 16, 36, 64
    q, k, v, do = qkv(B, H, n_img, n_text + n_img, D, seed=seed, dtype=torch.float16)
    caption_len = torch.tensor([5, 16])
    text_real = torch.arange(n_text)[None, :] < caption_len[:, None]                   # (B, n_text)
    kpm = torch.cat([text_real, torch.ones(B, n_img, dtype=torch.bool)], dim=1).to(DEVICE)  # (B, Lk)
    _, _, dk, dv = check(q, k, v, do, key_padding_mask=kpm, seed=seed)
    padded = ~kpm[:, None, :, None].expand_as(dk)
    assert torch.all(dk[padded] == 0) and torch.all(dv[padded] == 0), "padded text keys must get no gradient"


# ---- head dimensions ---------------------------------------------------------------------------

@pytest.mark.parametrize("D, Dv, dtype", [
    (16, 16, torch.float32), (40, 40, torch.float16), (64, 64, torch.bfloat16),
    (80, 80, torch.float32), (160, 160, torch.bfloat16), (256, 256, torch.float16),
    (40, 24, torch.float32),   # value width differs from the key width
    (96, 80, torch.bfloat16),  # 64 + 32 keys, 64 + 16 values
    (8, 200, torch.float32),   # D < 16 (one 16-wide piece), Dv = 200 (one 256-wide piece)
])
def test_head_dims(D, Dv, dtype, seed):
    """Non-powers of two (40, 80, 160 of SD 1.x) run as two pieces (32 + 16, 64 + 16, 128 + 32)."""
    L = 33 if max(D, Dv) <= 96 else 20
    check(*qkv(1, 2, L, L + 5, D, Dv, seed=seed, dtype=dtype), causal=D in (160, 96), seed=seed)


@pytest.mark.parametrize("d", range(1, fa.MAX_HEAD_DIM + 1))
def test_head_dim_pieces(d):
    """Each piece a power of two and a multiple of 16, together covering d; at most one piece of 16 to spare."""
    p0, p1 = fa.head_dim_pieces(d)
    for p in (p0, p1) if p1 else (p0,):
        assert p % 16 == 0 and p & (p - 1) == 0, (d, p0, p1)
    assert d <= p0 + p1 and p1 < p0
    assert fa.head_dim_waste(d) == (p0 + p1) / d


def test_head_dim_waste_of_stable_diffusion():
    """The docstring's table: 1.2x at 40, none at 80 and 160 (padding to a power of two: 1.6x each)."""
    assert fa.head_dim_pieces(40) == (32, 16) and fa.head_dim_waste(40) == 1.2
    assert fa.head_dim_pieces(80) == (64, 16) and fa.head_dim_waste(80) == 1.0
    assert fa.head_dim_pieces(160) == (128, 32) and fa.head_dim_waste(160) == 1.0
    for d in (16, 32, 64, 128, 256):
        assert fa.head_dim_pieces(d) == (d, 0)
    assert max(fa.head_dim_waste(d) for d in range(64, 257)) <= 4 / 3  # below 64, rounding up to 16 dominates


# ---- lengths -----------------------------------------------------------------------------------

@pytest.mark.parametrize("Lq, Lk", [(1, 1), (1, 70), (70, 1), (17, 33), (64, 64), (31, 65)])
def test_lengths(Lq, Lk, seed):
    """Lengths of 1, lengths that are not multiples of the block (32 here), exact multiples."""
    check(*qkv(2, 1, Lq, Lk, 16, seed=seed), seed=seed)
    if Lq <= Lk:
        check(*qkv(2, 1, Lq, Lk, 16, seed=seed + 7), causal=True, seed=seed)


# ---- strides -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bshd_views(dtype, seed):
    """q, k, v as transposes of (B, L, H, D) tensors, as a model's projections give them."""
    q, k, v, do = qkv(2, 3, 45, 50, 40, seed=seed, dtype=dtype, layout="bshd")
    assert not q.is_contiguous()
    o, dq, dk, dv = check(q, k, v, do, causal=True, seed=seed)
    assert o.stride() == q.stride(), "the output keeps the (B, L, H, D) memory order of q"
    assert dk.stride() == k.stride()


def test_unet_layout(seed):
    """Positions contiguous, features strided, as `course_lib.nn.unet` hands q, k, v over; keys joined to text."""
    q, k, v, do = qkv(2, 2, 36, 36, 32, seed=seed, dtype=torch.float16, layout="bhdl")
    assert q.stride(-2) == 1 and q.stride(-1) == 36
    text_k, text_v = randn((2, 2, 7, 32), seed + 9, torch.float16), randn((2, 2, 7, 32), seed + 10, torch.float16)
    k, v = torch.cat([text_k, k], dim=2), torch.cat([text_v, v], dim=2)
    kpm = torch.ones(2, 7 + 36, dtype=torch.bool, device=DEVICE)
    kpm[0, 3:7] = False
    o = check(q, k, v, do, key_padding_mask=kpm, seed=seed)[0]
    assert o.stride() == q.stride(), "the output comes back in the UNet's layout: transposing it back is free"


def test_odd_strides(seed):
    """A feature stride of 2, keys shared by the whole batch (stride 0), an output gradient of stride 0."""
    q, k, v, _ = qkv(2, 2, 40, 37, 64, seed=seed)
    q = q[..., ::2]                                  # (2, 2, 40, 32), feature stride 2
    k = k[:1, ..., :32].expand(2, -1, -1, -1)        # batch stride 0
    v = v[:1].expand(2, -1, -1, -1)
    do = torch.ones(1, 1, 1, 1, device=DEVICE).expand(2, 2, 40, 64)  # what o.sum().backward() sends
    assert q.stride(-1) == 2 and k.stride(0) == 0 and do.stride() == (0, 0, 0, 0)
    check(q, k, v, do, seed=seed)


# ---- key padding mask --------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(causal, seed):
    q, k, v, do = qkv(3, 2, 40, 70, 32, seed=seed, dtype=torch.float16)
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(3, 70, generator=g) > 0.4
    kpm[1] = False                 # a sequence with no real key: its output and gradients are 0
    kpm[2, :35] = False            # a long padded prefix: whole key blocks masked
    kpm = kpm.to(DEVICE)
    o, dq, dk, dv = check(q, k, v, do, key_padding_mask=kpm, causal=causal, seed=seed)
    assert torch.all(o[1] == 0) and torch.all(dq[1] == 0) and torch.all(dk[1] == 0)


# ---- tilings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (32, 16), (64, 16)])
def test_block_sizes(block_m, block_n, monkeypatch, seed):
    """The result does not depend on the tiling (with causal cross attention, the hardest case)."""
    if CUDA:
        pytest.skip("on a GPU the autotuner picks the blocks")
    monkeypatch.setattr(fa, "INTERPRET_BLOCK_M", block_m)
    monkeypatch.setattr(fa, "INTERPRET_BLOCK_N", block_n)
    check(*qkv(1, 2, 50, 67, 16, seed=seed), causal=True, seed=seed)
    check(*qkv(1, 2, 67, 50, 16, seed=seed + 5, dtype=torch.float16), causal=True, seed=seed)


# ---- every element is written ------------------------------------------------------------------

@pytest.mark.parametrize("dtype, masked", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_poisoned_outputs_are_overwritten(dtype, masked, monkeypatch, seed):
    """Every buffer the kernels write (O, logsumexp, delta, dQ, dK, dV) starts as NaN here.

    A row, lane or block the kernels forgot would stay NaN (or spread NaN into the gradients).
    masked: causal with a padding mask (D = 40 in two pieces, Dv = 24 in one); unmasked: the
    fast paths only (D = 80 and Dv = 40, both in two pieces), with lengths that fit no block.
    """
    allocated = []

    def poisoned(shape, dtype, device, like=None):
        x = real_alloc(shape, dtype, device, like)
        allocated.append(x)
        return x.fill_(float("nan"))

    real_alloc = fa._alloc
    monkeypatch.setattr(fa, "_alloc", poisoned)
    if masked:
        kpm = (torch.arange(53)[None, :] < torch.tensor([[53], [20]])).to(DEVICE)  # (2, 53)
        got = check(*qkv(2, 2, 61, 53, 40, 24, seed=seed, dtype=dtype), causal=True, key_padding_mask=kpm, seed=seed)
    else:
        got = check(*qkv(2, 1, 45, 70, 80, 40, seed=seed, dtype=dtype), seed=seed)
    assert len(allocated) == 6, [tuple(x.shape) for x in allocated]  # o, lse, delta, dq, dk, dv
    for name, x in zip(("o", "dq", "dk", "dv"), got):
        assert not torch.isnan(x).any(), f"{name} has elements the kernel never wrote"


# ---- what runs, and its properties -------------------------------------------------------------

def test_the_triton_kernels_run(monkeypatch):
    """No silent fallback: SDPA and the reference are disabled, and the three kernels launch."""
    launched = []
    real_launcher = fa._launcher

    def counting(kernel):
        launched.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        return real_launcher(kernel)

    def forbidden(*args, **kwargs):
        raise AssertionError("a fallback ran instead of the kernel")

    monkeypatch.setattr(fa, "_launcher", counting)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
    monkeypatch.setattr(torch, "softmax", forbidden)
    q, k, v, do = qkv(1, 1, 20, 20, 16, seed=0)
    q.requires_grad_()
    o = fa.flash_attention(q, k, v)
    assert launched == ["_attn_fwd"]
    o.backward(do)
    assert launched == ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    assert CUDA or fa.is_interpreted()
    launched.clear()
    fa.flash_attention(q, k, v, deterministic=False).backward(do)
    assert launched == ["_attn_fwd", "_attn_bwd_dkdv"], "the atomic variant needs no dQ kernel"


def test_scale(seed):
    """Any finite scale: the fast path folds a positive one into one FMA; zero and negative ones run masked."""
    q, k, v, do = qkv(1, 2, 30, 40, 32, seed=seed)
    check(q, k, v, do, scale=0.3, seed=seed)
    check(q, k, v, do, scale=-0.4, seed=seed)  # the row max of raw scores would be the min here
    o = fa.flash_attention(q, k, v, scale=0.0)  # scale 0: every query averages all values
    torch.testing.assert_close(o, v.mean(dim=2, keepdim=True).expand_as(o), rtol=1e-5, atol=1e-5)


# ---- sharp softmax: large logits whose row maximum moves from block to block -----------------

@pytest.mark.parametrize("dtype, causal", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
def test_sharp_softmax(dtype, causal, seed):
    """Scores of tens of units, with a ramp along the keys that moves each row's maximum into a later
    block (head 0) or keeps it in the first (head 1): every rescale by alpha = exp2(m_old - m_new) counts."""
    B, H, L, D = 1, 2, 70, 32
    q, k, v, do = qkv(B, H, L, L, D, seed=seed)
    g = torch.Generator().manual_seed(seed + 11)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0).to(DEVICE)
    ramp = torch.linspace(0, 6, L, device=DEVICE)
    ramp = torch.stack([ramp, ramp.flip(0)])[None, :, :, None]           # (1, H, L, 1): up in head 0, down in 1
    q = 3 * q + 8 * u
    k = 3 * k + ramp * u
    check(q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype), causal=causal, seed=seed)


# ---- the atomic-dQ backward (deterministic=False) ---------------------------------------------

@pytest.mark.parametrize("dtype, causal", [(torch.float32, True), (torch.bfloat16, False)])
def test_atomic_dq(dtype, causal, seed):
    """FlashAttention-2's own Algorithm 2: every key block adds its dS K into dQ; same numbers."""
    q, k, v, do = qkv(2, 2, 45, 50, 40, seed=seed, dtype=dtype)
    kpm = torch.ones(2, 50, dtype=torch.bool, device=DEVICE)
    kpm[1, 30:] = False
    check(q, k, v, do, causal=causal, key_padding_mask=kpm, deterministic=False, seed=seed)


# ---- special values -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, inside the interpreter
def test_nan_propagates_and_empty_rows_are_zero(seed):
    """A NaN query row gives a NaN output row, as in the reference; a row that sees no key gives 0."""
    q, k, v, _ = qkv(2, 1, 40, 37, 16, seed=seed)
    q[0, 0, 5, 3] = float("nan")
    kpm = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    kpm[1] = False
    o = fa.flash_attention(q, k, v, key_padding_mask=kpm)
    want = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=kpm)
    assert torch.isnan(o[0, 0, 5]).all() and torch.isnan(want[0, 0, 5]).all()
    assert torch.isfinite(o[0, 0, :5]).all() and torch.isfinite(o[0, 0, 6:]).all()
    assert torch.all(o[1] == 0)
    v[0, 0, 36, 0] = float("nan")  # a NaN value that every row of batch 0 sees: their first feature is NaN
    o = fa.flash_attention(q, k, v)
    assert torch.isnan(o[0, 0, :, 0]).all() and torch.isfinite(o[1]).all()


def test_deterministic(seed):
    """No atomics: two runs give the same bits."""
    q, k, v, do = qkv(1, 2, 40, 40, 32, seed=seed, dtype=torch.bfloat16)
    first, second = run(fa.flash_attention, q, k, v, do), run(fa.flash_attention, q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_softmax_rows_sum_to_one(seed):
    """With V the identity (Lk = Dv), the output rows are the attention probabilities."""
    q, k, _, _ = qkv(1, 1, 25, 32, 16, seed=seed)
    v = torch.eye(32, device=DEVICE)[None, None]
    p = fa.flash_attention(q, k, v, causal=True, fp32_precision="ieee")
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 1, 25, device=DEVICE))
    assert torch.all(p.triu(diagonal=32 - 25 + 1) == 0), "a query saw a key in its causal future"


# ---- errors ------------------------------------------------------------------------------------

def test_clear_errors():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        fa.flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(TypeError, match="share a dtype"):
        fa.flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="shapes do not match"):
        fa.flash_attention(q, q[:, :1], q)
    with pytest.raises(ValueError, match="up to 256"):
        big = torch.randn(1, 1, 4, 320, device=DEVICE)
        fa.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="key_padding_mask"):
        fa.flash_attention(q, q, q, key_padding_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        fa.flash_attention(q[:, :, :0], q, q)
    with pytest.raises(ValueError, match="fp32_precision"):
        fa.flash_attention(q, q, q, fp32_precision="tf16")
    with pytest.raises(TypeError, match="bool"):  # 0.5 would be masked by a cast to int8, visible by bool()
        fa.flash_attention(q, q, q, key_padding_mask=torch.full((1, 8), 0.5))
    with pytest.raises(ValueError, match="finite"):
        fa.flash_attention(q, q, q, scale=float("nan"))


# ---- the launch: one grid axis, autotuner candidates --------------------------------------------

def test_grid_has_one_axis():
    """B * H on a second grid axis would be capped at 65535; one axis holds 2^31 - 1 programs."""
    assert fa.grid_1d(4, 70_000) == (280_000,)
    with pytest.raises(ValueError, match="grid"):
        fa.grid_1d(2**16, 2**15)


@pytest.mark.parametrize("kernel", list(fa.CONFIGS))
@pytest.mark.parametrize("d", [40, 64, 80, 128, 160, 256])
def test_candidate_configs(kernel, d):
    """Pruning counts Q once and K, V per pipeline stage; it never leaves the autotuner empty-handed,
    and small problems always keep a 64-row (or smaller) block to fill the GPU's SMs."""
    kept = fa.candidate_configs(kernel, d, d, 2)
    assert kept
    for bm, bn, w, stages in kept:
        smem, regs = fa.tile_footprint(kernel, bm, bn, w, stages, d, d, 2)
        assert smem <= fa.SHARED_MEMORY_BYTES and (regs <= fa.REGISTER_BUDGET or len(kept) == 1)
    if kernel == "_attn_fwd":
        assert any(bm <= 64 for bm, *_ in kept)
        if d <= 128:
            assert (128, 128, 8, 2) in kept, "128 x 128 tiles with 8 warps fit here"
    p0, p1 = fa.head_dim_pieces(d)
    smem_q = 2 * 128 * (p0 + p1)
    assert fa.tile_footprint("_attn_fwd", 128, 64, 4, 3, d, d, 2)[0] == smem_q + 3 * 64 * 2 * 2 * (p0 + p1)


def test_fp32_precision_follows_torch(monkeypatch):
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert fa._precision(None, torch.float32) == "tf32"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert fa._precision(None, torch.float32) == "ieee"
    assert fa._precision("tf32", torch.float32) == "tf32"


# ---- on a GPU: full-size shapes against the reference and SDPA ---------------------------------

@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape, causal", [
    ((2, 8, 1024, 1024, 80), False), ((2, 8, 1024, 77, 40), False), ((2, 6, 512, 640, 64), False),
    ((2, 4, 333, 333, 160), True), ((1, 4, 257, 300, 256), False), ((2, 32, 81, 81, 64), True),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_shapes(shape, causal, dtype, seed):
    B, H, Lq, Lk, D = shape
    check(*qkv(B, H, Lq, Lk, D, seed=seed, dtype=dtype), causal=causal, seed=seed)


@needs_cuda
@pytest.mark.cuda
def test_gpu_many_heads(seed):
    """B * H = 70000 programs' worth of heads: more than a second grid axis could hold."""
    q, k, v, do = qkv(2, 35_000, 16, 16, 16, seed=seed, dtype=torch.bfloat16)
    check(q, k, v, do, seed=seed)


@needs_cuda
@pytest.mark.cuda
def test_gpu_int64_offsets(seed):
    """The second batch element starts past 2^31 elements: offsets must be computed in 64 bits."""
    n = 2**31 + 64 * 64
    storage = torch.empty(n + 64 * 64, dtype=torch.bfloat16, device="cuda")
    x = storage.as_strided((2, 1, 64, 64), (n, 64 * 64, 64, 1))  # 4 GiB apart
    x.copy_(randn((2, 1, 64, 64), seed, torch.bfloat16))
    o = fa.flash_attention(x, x, x)
    torch.testing.assert_close(o.float(), attention_reference(*(x.float(),) * 3), atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.cuda
def test_gpu_bshd_and_tf32(seed):
    q, k, v, do = qkv(2, 8, 512, 512, 40, seed=seed, dtype=torch.float32, layout="bshd")
    o = fa.flash_attention(q, k, v, fp32_precision="tf32")
    want = attention_reference(q.double(), k.double(), v.double())
    assert (o.double() - want).abs().max().item() < 1e-2  # tf32 keeps 10 mantissa bits
    assert math.isfinite(o.sum().item())
