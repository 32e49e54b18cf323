"""The PyTorch SAM 2.1 reference (PyPI ``sam2==1.1.0``) with random weights, for parity tests.

Only tests and benchmarks import this module (it imports torch).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install -e '.[test]')")
pytest.importorskip("sam2", reason="parity tests need the sam2==1.1.0 reference (see README)")

from sam2.build_sam import build_sam2  # noqa: E402

CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}

torch.set_num_threads(2)


def randomize_(module, seed: int = 0):
    """Give every parameter and buffer a non-trivial random value (torch init leaves many
    at 0/1 or 1e-6, which would hide mistakes). Deterministic from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.dtype.is_floating_point:
                continue
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                val = r / np.sqrt(max(fan_in, 1))
            elif name.endswith("weight") or name.endswith("gamma"):
                val = 1.0 + 0.1 * r  # norm scales / layer-scale near 1
            else:
                val = 0.1 * r
            p.copy_(val.to(p.dtype))
    return module


@functools.lru_cache(maxsize=8)
def reference_model(size: str = "tiny", image_size: int = 1024, seed: int = 0):
    """A randomly initialised torch SAM2Base (eval mode, CPU, float32)."""
    overrides = [f"++model.image_size={image_size}"]
    model = build_sam2(CONFIGS[size], ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
    randomize_(model, seed)
    return model.eval()


def numpy_state_dict(module, prefix: str = "") -> dict[str, np.ndarray]:
    """``module.state_dict()`` as numpy, optionally only keys under ``prefix`` (prefix removed)."""
    out = {}
    for k, v in module.state_dict().items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v.detach().cpu().numpy()
    return out


def to_nhwc(t) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def to_nchw(x) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def max_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))
