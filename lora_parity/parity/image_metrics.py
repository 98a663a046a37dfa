"""Full-image metrics on 0..255 pixels: MAE (the user's bar), max error, PSNR, SSIM (scikit-image)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ImageMetrics:
    mae: float
    max_error: int
    psnr: float
    ssim: float
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def image_metrics(a: np.ndarray, b: np.ndarray) -> ImageMetrics:
    """Compare two uint8 HxWx3 images (``b`` is the reference)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mae = float(diff.mean())
    psnr = float("inf") if not diff.any() else float(peak_signal_noise_ratio(b, a, data_range=255))
    win = min(7, min(a.shape[:2]) // 2 * 2 - 1)
    ssim = float(structural_similarity(b, a, data_range=255, channel_axis=-1, win_size=max(win, 3)))
    return ImageMetrics(mae=mae, max_error=int(diff.max()), psnr=psnr, ssim=ssim, shape=tuple(a.shape))
