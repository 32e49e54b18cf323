"""MV_MoE (LM-EEC SPEC point 5): torch parity, state-dict names, hand-made cases."""

from __future__ import annotations

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmeec_jax.models.mv_moe import MV_MoE, mv_moe_or_view
from lmeec_jax.models.weights import load_state_dict, to_state_dict, torch_names

REF_FILE = "/tmp/ref/juneyeeHu+LM-EEC/sam2/modeling/sam2_base.py"

EXPECTED_KEYS = {
    "mlp1.0.weight", "mlp1.0.bias", "mlp1.2.weight", "mlp1.2.bias",
    "mlp2.0.weight", "mlp2.0.bias", "mlp2.2.weight", "mlp2.2.bias",
    "conv1.0.weight", "conv1.2.weight", "conv2.0.weight", "conv2.2.weight",
}


def _torch_mv_moe_class():
    """The reference class. Importing sam2_base.py would import the LM-EEC ``sam2`` package
    (clashing with PyPI sam2), sklearn and matplotlib, so only the ``class MV_MoE`` source is
    parsed out of the file and executed with ``torch``/``nn`` in scope. Without the reference
    checkout, a test-only re-creation of the same definition is used."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    if os.path.exists(REF_FILE):
        src = open(REF_FILE).read()
        tree = ast.parse(src)
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MV_MoE")
        ns = {"torch": torch, "nn": nn}
        exec(compile(ast.Module(body=[node], type_ignores=[]), REF_FILE, "exec"), ns)
        return ns["MV_MoE"], "reference source"

    class MV_MoE_T(nn.Module):  # same layers as the reference (sam2_base.py l.1876-1924)
        def __init__(self, c):
            super().__init__()
            self.mlp1 = nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c), nn.Sigmoid())
            self.mlp2 = nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c), nn.Sigmoid())
            self.conv1 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c, 1, 1, bias=False), nn.Sigmoid())
            self.conv2 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c, 1, 1, bias=False), nn.Sigmoid())

        def forward(self, m, v):
            both = torch.cat((m.mean(dim=(2, 3)), v.mean(dim=(2, 3))), dim=1)
            m = m + m * self.mlp1(both)[..., None, None]
            v = v + v * self.mlp2(both)[..., None, None]
            x = torch.cat((m, v), dim=1)
            return (m + m * self.conv1(x)) + (v + v * self.conv2(x))

    return MV_MoE_T, "test re-creation"


def _module(c=256, seed=0):
    return MV_MoE(c, rngs=nnx.Rngs(seed))


def test_state_dict_names_and_roundtrip():
    m = _module()
    assert set(torch_names(m)) == EXPECTED_KEYS
    sd = to_state_dict(m)
    assert sd["mlp1.0.weight"].shape == (256, 512) and sd["mlp1.0.bias"].shape == (256,)
    assert sd["mlp2.2.weight"].shape == (256, 256)
    assert sd["conv1.0.weight"].shape == (256, 512, 3, 3)
    assert sd["conv2.2.weight"].shape == (1, 256, 1, 1)
    m2 = _module(seed=1)
    load_state_dict(m2, sd)
    for k, v in to_state_dict(m2).items():
        np.testing.assert_array_equal(v, sd[k])


def test_parity_with_reference_torch_module():
    torch = pytest.importorskip("torch")
    cls, origin = _torch_mv_moe_class()
    torch.manual_seed(0)
    ref = cls(256).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial random weights (biases too), fan-in scaled
        for name, p in ref.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r / np.sqrt(np.prod(p.shape[1:])) if p.ndim > 1 else 0.5 * r)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert set(sd) == EXPECTED_KEYS, origin

    m = _module(seed=3)
    load_state_dict(m, sd)

    rng = np.random.default_rng(0)
    B, H, W, C = 2, 30, 30, 256  # 480 input -> 30x30 stride-16 features
    M = rng.standard_normal((B, H, W, C)).astype(np.float32)
    V = (rng.standard_normal((B, H, W, C)) + 0.3).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(M).permute(0, 3, 1, 2), torch.from_numpy(V).permute(0, 3, 1, 2))
    want = want.permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda a, b: m(a, b))(M, V))
    err = np.abs(got - want).max()
    print(f"MV_MoE parity ({origin}): max abs err {err:.3e}, max |out| {np.abs(want).max():.2f}")
    assert err < 2e-5


def _zero_all(m):
    sd = {k: np.zeros_like(v) for k, v in to_state_dict(m).items()}
    load_state_dict(m, sd)
    return sd


def test_zero_weights_give_half_gates():
    m = _module()
    _zero_all(m)
    rng = np.random.default_rng(1)
    M = jnp.asarray(rng.standard_normal((1, 5, 7, 256)), jnp.float32)
    V = jnp.asarray(rng.standard_normal((1, 5, 7, 256)), jnp.float32)
    aM, aV = m.channel_gates(M, V)
    np.testing.assert_array_equal(np.asarray(aM), 0.5)
    np.testing.assert_array_equal(np.asarray(aV), 0.5)
    # M1 = 1.5 M, V1 = 1.5 V, spatial gates 0.5 -> out = 1.5 * 1.5 * (M + V)
    np.testing.assert_allclose(np.asarray(m(M, V)), 2.25 * np.asarray(M + V), rtol=1e-6, atol=1e-6)


def test_saturated_channel_gates():
    m = _module()
    sd = _zero_all(m)
    sd["mlp1.2.bias"] = np.full((256,), 100.0, np.float32)  # aM = 1
    sd["mlp2.2.bias"] = np.full((256,), -100.0, np.float32)  # aV = 0
    load_state_dict(m, sd)
    rng = np.random.default_rng(2)
    M = jnp.asarray(rng.standard_normal((2, 4, 4, 256)), jnp.float32)
    V = jnp.asarray(rng.standard_normal((2, 4, 4, 256)), jnp.float32)
    # M1 = 2M, V1 = V; spatial gates 0.5 -> out = 1.5 * 2M + 1.5 * V
    np.testing.assert_allclose(np.asarray(m(M, V)), np.asarray(3.0 * M + 1.5 * V), rtol=1e-6, atol=1e-6)


def test_spatial_gate_by_hand():
    """conv1 = centre tap picking channel 0 of X (= M1[..., 0]) -> sM = sigmoid(relu(M1[..., 0]));
    conv2 = picks channel 256 of X (= V1[..., 0]) with weight -1 -> sV = sigmoid(-relu(V1[..., 0]))."""
    m = _module()
    sd = _zero_all(m)
    w1 = np.zeros((256, 512, 3, 3), np.float32)
    w1[0, 0, 1, 1] = 1.0
    w2 = np.zeros((256, 512, 3, 3), np.float32)
    w2[0, 256, 1, 1] = 1.0
    p1 = np.zeros((1, 256, 1, 1), np.float32)
    p1[0, 0] = 1.0
    p2 = np.zeros((1, 256, 1, 1), np.float32)
    p2[0, 0] = -1.0
    sd.update({"conv1.0.weight": w1, "conv2.0.weight": w2, "conv1.2.weight": p1, "conv2.2.weight": p2})
    load_state_dict(m, sd)
    rng = np.random.default_rng(3)
    M = rng.standard_normal((1, 6, 5, 256)).astype(np.float32)
    V = rng.standard_normal((1, 6, 5, 256)).astype(np.float32)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    M1, V1 = 1.5 * M, 1.5 * V  # channel gates 0.5
    sM = sig(np.maximum(M1[..., :1], 0))
    sV = sig(-np.maximum(V1[..., :1], 0))
    want = (M1 + M1 * sM) + (V1 + V1 * sV)
    np.testing.assert_allclose(np.asarray(m(jnp.asarray(M), jnp.asarray(V))), want, rtol=1e-5, atol=1e-5)


def test_batch_elements_are_independent_and_or_view_switch():
    m = _module(seed=5)
    rng = np.random.default_rng(4)
    M = jnp.asarray(rng.standard_normal((2, 6, 6, 256)), jnp.float32)
    V = jnp.asarray(rng.standard_normal((2, 6, 6, 256)), jnp.float32)
    both = np.asarray(m(M, V))
    one = np.asarray(m(M[1:], V[1:]))
    np.testing.assert_allclose(both[1:], one, rtol=1e-5, atol=1e-5)
    f = jax.jit(lambda a, b, h: mv_moe_or_view(m, a, b, h))
    np.testing.assert_array_equal(np.asarray(f(M, V, False)), np.asarray(V))
    np.testing.assert_allclose(np.asarray(f(M, V, True)), both, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        m(M, V[..., :128])
