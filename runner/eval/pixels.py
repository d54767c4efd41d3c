"""Weight-free pixel distances between two images of the same size: SSIM (Wang et al. 2004, on the luma
channel, 11x11 Gaussian window with sigma 1.5, K1=0.01, K2=0.03 — scikit-image's `structural_similarity` with
`gaussian_weights=True, use_sample_covariance=False, data_range=255`) and the mean absolute difference."""

from __future__ import annotations

from typing import Any

import numpy as np

SIGMA = 1.5
TRUNCATE = 3.5  # scikit-image's truncate: an 11-pixel window for sigma 1.5


def luma(image: Any) -> np.ndarray:
    """ITU-R 601 luma (Pillow's "L" conversion) as float64."""
    return np.asarray(image.convert("L"), dtype=np.float64)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two grayscale arrays (the border of half a window cropped, as scikit-image does)."""
    from scipy.ndimage import gaussian_filter

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma=SIGMA, truncate=TRUNCATE, mode="reflect")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ua, ub = blur(a), blur(b)
    vaa, vbb, vab = blur(a * a) - ua * ua, blur(b * b) - ub * ub, blur(a * b) - ua * ub
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (vaa + vbb + c2))
    pad = (int(TRUNCATE * SIGMA + 0.5) * 2 + 1 - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean()) if min(s.shape) > 2 * pad else float(s.mean())


def mad(a: Any, b: Any) -> float:
    """Mean absolute difference of the RGB pixels, in [0, 1] (0 = identical)."""
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    return float(np.abs(x - y).mean() / 255.0)


def pixel_distances(image: Any, baseline: Any) -> dict[str, float]:
    """`lora_effect_ssim` (1 - SSIM) and `lora_effect_mad` of an image against its baseline (resized to the
    image's size when they differ)."""
    if baseline.size != image.size:
        baseline = baseline.resize(image.size)
    return {"lora_effect_ssim": 1.0 - ssim(luma(image), luma(baseline)), "lora_effect_mad": mad(image, baseline)}
