"""Parity of the memory encoder, RoPE and memory attention with sam2==1.1.0 (tiny, random
weights), at image size 480 (30×30 memory, the LM-EEC setting) and 1024 (64×64).

Tolerances: everything runs in float32 with matmul precision "highest"; the outputs are
O(1)-O(10), and the observed differences are summation-order noise (~1e-6 .. 1e-5), so the
bound is 1e-4 relative to max(1, max|reference|).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import max_err, numpy_state_dict, reference_model, to_nchw, to_nhwc, torch

from lmeec_jax.models.memory_attention import MemoryAttention, MemoryAttentionLayer, RoPEAttention
from lmeec_jax.models.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from lmeec_jax.models.position_encoding import PositionEmbeddingSine
from lmeec_jax.models.rope import apply_rotary_enc, compute_axial_cis, freqs_for_length
from lmeec_jax.models.weights import load_state_dict

RTOL = 1e-4


def _check(name, ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    err = max_err(ours, ref)
    scale = max(1.0, float(np.abs(ref).max()))
    print(f"\n[{name}] max abs err {err:.3e} (max |ref| {np.abs(ref).max():.3g})")
    assert err <= RTOL * scale, (name, err, scale)
    return err


# ---------------------------------------------------------------- builders (tiny yaml)
def build_memory_encoder(rngs):
    ds = MaskDownSampler(kernel_size=3, stride=2, padding=1, rngs=rngs)
    cx = CXBlock(dim=256, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True, rngs=rngs)
    fuser = Fuser(layer=cx, num_layers=2, rngs=rngs)
    pe = PositionEmbeddingSine(num_pos_feats=64, normalize=True, scale=None, temperature=10000)
    return MemoryEncoder(out_dim=64, mask_downsampler=ds, fuser=fuser, position_encoding=pe, rngs=rngs)


def build_memory_attention(rngs, d_model=256, kv_dim=64, ff=2048, feat_sizes=(64, 64), dropout=0.1, num_layers=4):
    self_attn = RoPEAttention(embedding_dim=d_model, num_heads=1, downsample_rate=1, dropout=dropout,
                              rope_theta=10000.0, feat_sizes=feat_sizes, rngs=rngs)
    cross_attn = RoPEAttention(embedding_dim=d_model, num_heads=1, downsample_rate=1, dropout=dropout,
                               kv_in_dim=kv_dim, rope_theta=10000.0, feat_sizes=feat_sizes,
                               rope_k_repeat=True, rngs=rngs)
    layer = MemoryAttentionLayer(activation="relu", cross_attention=cross_attn, d_model=d_model,
                                 dim_feedforward=ff, dropout=dropout, pos_enc_at_attn=False,
                                 pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
                                 self_attention=self_attn, rngs=rngs)
    return MemoryAttention(d_model=d_model, pos_enc_at_input=True, layer=layer, num_layers=num_layers,
                           batch_first=True, rngs=rngs)


@pytest.fixture(scope="module", params=[480, 1024])
def ref(request):
    return request.param, reference_model("tiny", request.param)


@pytest.fixture(scope="module")
def ref480():
    return reference_model("tiny", 480)


@pytest.fixture(scope="module")
def ma480(ref480):
    m = build_memory_attention(nnx.Rngs(0))
    load_state_dict(m, numpy_state_dict(ref480.memory_attention))
    return m


# ---------------------------------------------------------------- memory encoder
@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_memory_encoder_parity(ref, skip_mask_sigmoid):
    image_size, model = ref
    tm = model.memory_encoder
    me = build_memory_encoder(nnx.Rngs(0))
    load_state_dict(me, numpy_state_dict(tm))
    h = image_size // 16
    rng = np.random.default_rng(1)
    pix = rng.standard_normal((2, 256, h, h), dtype=np.float32)
    masks = 4.0 * rng.standard_normal((2, 1, image_size, image_size), dtype=np.float32)
    if skip_mask_sigmoid:  # what SAM2Base feeds: sigmoid(logits) * 20 - 10
        masks = (1 / (1 + np.exp(-masks)) * 20 - 10).astype(np.float32)
    with torch.no_grad():
        out_t = tm(torch.from_numpy(pix), torch.from_numpy(masks), skip_mask_sigmoid=skip_mask_sigmoid)
    out = jax.jit(lambda p, m: me(p, m, skip_mask_sigmoid=skip_mask_sigmoid))(
        jnp.asarray(to_nhwc(torch.from_numpy(pix))), jnp.asarray(masks[:, 0])  # [B, H, W] form
    )
    tag = f"memory_encoder {image_size} skip_sigmoid={skip_mask_sigmoid}"
    assert out["vision_features"].shape == (2, h, h, 64)
    _check(tag + " features", out["vision_features"], to_nhwc(out_t["vision_features"]))
    _check(tag + " pos", out["vision_pos_enc"][0], to_nhwc(out_t["vision_pos_enc"][0]))


# ---------------------------------------------------------------- RoPE
def test_rope_tables_follow_torch(ref480):
    from sam2.modeling.position_encoding import compute_axial_cis as torch_cis

    for side in (30, 64):
        t = torch_cis(256, side, side).numpy()
        c, s = compute_axial_cis(256, side, side)
        assert max_err(c, t.real) < 1e-6 and max_err(s, t.imag) < 1e-6
    # sam2 1.1.0 rebuilds the table for a 900-token query although feat_sizes is [64, 64]
    attn = ref480.memory_attention.layers[0].cross_attn_image
    assert attn.freqs_cis.shape[0] in (900, 4096)
    c, s = freqs_for_length(256, 900, (64, 64))
    assert c.shape == (900, 128)
    with pytest.raises(ValueError):
        freqs_for_length(256, 901, (64, 64))


@pytest.mark.parametrize("frames,excl", [(1, 0), (3, 5), (2, 8)])
def test_apply_rotary_enc_parity(frames, excl):
    from sam2.modeling.position_encoding import apply_rotary_enc as torch_rope
    from sam2.modeling.position_encoding import compute_axial_cis as torch_cis

    n, d = 36, 16
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 1, n, d), dtype=np.float32)
    k = rng.standard_normal((2, 1, frames * n + excl, d), dtype=np.float32)
    fc = torch_cis(d, 6, 6)
    kt = torch.from_numpy(k.copy())
    nr = k.shape[2] - excl
    qt, kt[:, :, :nr] = torch_rope(torch.from_numpy(q), kt[:, :, :nr], freqs_cis=fc, repeat_freqs_k=True)
    c, s = compute_axial_cis(d, 6, 6)
    qo, ko = apply_rotary_enc(jnp.asarray(q), jnp.asarray(k), c, s, repeat_freqs_k=True, num_k_exclude_rope=excl)
    assert max_err(qo, qt.numpy()) < 1e-5
    assert max_err(ko, kt.numpy()) < 1e-5
    np.testing.assert_array_equal(np.asarray(ko)[:, :, nr:], k[:, :, nr:])


# ---------------------------------------------------------------- memory attention
def _ma_inputs(rng, b, n, frames, ptr):
    curr = rng.standard_normal((b, n, 256), dtype=np.float32)
    curr_pos = rng.standard_normal((b, n, 256), dtype=np.float32)
    m = frames * n + ptr
    mem = rng.standard_normal((b, m, 64), dtype=np.float32)
    mem_pos = rng.standard_normal((b, m, 64), dtype=np.float32)
    return curr, curr_pos, mem, mem_pos


def _torch_ma(tma, curr, curr_pos, mem, mem_pos, ptr):
    seq = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2)))  # noqa: E731
    with torch.no_grad():
        out = tma(curr=[seq(curr)], curr_pos=[seq(curr_pos)], memory=seq(mem), memory_pos=seq(mem_pos),
                  num_obj_ptr_tokens=ptr)
    return out.numpy().transpose(1, 0, 2)


_ma_jit = nnx.jit(lambda m, c, cp, me, mp, ptr, mask: m(c, cp, me, mp, ptr, memory_mask=mask),
                  static_argnums=(5,))


@pytest.mark.parametrize("frames,ptr", [(1, 0), (1, 4), (3, 0), (3, 8), (7, 16)])
def test_memory_attention_parity_480(ref480, ma480, frames, ptr):
    rng = np.random.default_rng(10 * frames + ptr)
    curr, curr_pos, mem, mem_pos = _ma_inputs(rng, 2, 900, frames, ptr)
    ref = _torch_ma(ref480.memory_attention, curr, curr_pos, mem, mem_pos, ptr)
    out = _ma_jit(ma480, curr, curr_pos, mem, mem_pos, ptr, None)
    _check(f"memory_attention 480 frames={frames} ptr={ptr}", out, ref)


def test_memory_attention_parity_1024():
    model = reference_model("tiny", 1024)
    ma = build_memory_attention(nnx.Rngs(0))
    load_state_dict(ma, numpy_state_dict(model.memory_attention))
    rng = np.random.default_rng(3)
    curr, curr_pos, mem, mem_pos = _ma_inputs(rng, 1, 4096, 2, 4)
    ref = _torch_ma(model.memory_attention, curr, curr_pos, mem, mem_pos, 4)
    out = _ma_jit(ma, curr, curr_pos, mem, mem_pos, 4, None)
    _check("memory_attention 1024 frames=2 ptr=4", out, ref)


def test_memory_attention_padded_slots(ref480, ma480):
    """Masked frame slots (anywhere) and masked pointer tokens change nothing."""
    n, frames, ptr = 900, 3, 8
    rng = np.random.default_rng(7)
    curr, curr_pos, mem, mem_pos = _ma_inputs(rng, 2, n, frames, ptr)
    ref = _torch_ma(ref480.memory_attention, curr, curr_pos, mem, mem_pos, ptr)
    plain = np.asarray(_ma_jit(ma480, curr, curr_pos, mem, mem_pos, ptr, None))

    slots, pslots = 5, 12
    valid_slots = [[1, 2, 4], [0, 3, 4]]  # per batch row: where its 3 frames go
    valid_ptrs = [[0, 1, 2, 5, 6, 7, 9, 11], [2, 3, 4, 5, 6, 7, 8, 10]]
    pm = 50.0 * rng.standard_normal((2, slots * n + pslots, 64), dtype=np.float32)  # garbage
    pp = 50.0 * rng.standard_normal((2, slots * n + pslots, 64), dtype=np.float32)
    mask = np.zeros((2, slots * n + pslots), bool)
    for b in range(2):
        for i, s in enumerate(valid_slots[b]):
            pm[b, s * n:(s + 1) * n] = mem[b, i * n:(i + 1) * n]
            pp[b, s * n:(s + 1) * n] = mem_pos[b, i * n:(i + 1) * n]
            mask[b, s * n:(s + 1) * n] = True
        for i, s in enumerate(valid_ptrs[b]):
            pm[b, slots * n + s] = mem[b, frames * n + i]
            pp[b, slots * n + s] = mem_pos[b, frames * n + i]
            mask[b, slots * n + s] = True
    padded = np.asarray(_ma_jit(ma480, curr, curr_pos, pm, pp, pslots, jnp.asarray(mask)))
    e = max_err(padded, plain)
    print(f"\n[padded vs unpadded (ours)] max abs err {e:.3e}")
    assert e < 1e-5
    _check("memory_attention 480 padded (5 slots/12 ptr) vs torch unpadded", padded, ref)


def test_memory_attention_dropout_modes():
    """Inference by default; .train() enables the configured dropout, .eval() disables it."""
    ma = build_memory_attention(nnx.Rngs(0, dropout=1), d_model=32, kv_dim=16, ff=64, feat_sizes=(4, 4),
                                num_layers=1)
    rng = np.random.default_rng(0)
    c = rng.standard_normal((1, 16, 32), dtype=np.float32)
    m = rng.standard_normal((1, 2 * 16 + 4, 16), dtype=np.float32)
    a = ma(c, c, m, m, 4)
    np.testing.assert_array_equal(a, ma(c, c, m, m, 4))
    ma.train()
    f = nnx.jit(lambda mod, x, y: mod(x, x, y, y, 4))
    b1, b2 = f(ma, c, m), f(ma, c, m)
    assert np.abs(np.asarray(b1) - np.asarray(a)).max() > 1e-3
    assert np.abs(np.asarray(b1) - np.asarray(b2)).max() > 1e-3  # fresh masks per call
    ma.eval()
    np.testing.assert_allclose(ma(c, c, m, m, 4), a, atol=1e-6)
