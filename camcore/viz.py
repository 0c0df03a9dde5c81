"""Visualisation: a map laid over its image as a heat-map, a caption, written as PNG. Needs ``matplotlib`` and
``opencv-python-headless`` (extra ``viz``)."""
from __future__ import annotations

import numpy as np

__all__ = ["overlay", "guided_image", "caption", "save_png", "png_bytes"]


def overlay(image, cam, /, *, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """Blend a ``(H, W)`` map in ``[0, 1]`` over an ``(H, W, 3)`` image in ``[0, 1]`` (or uint8).

    Returns ``(H, W, 3)`` float32 in ``[0, 1]``: ``(1 - alpha) * image + alpha * colormap(cam)``.
    """
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    image = image / 255.0 if image.max() > 1.0 else image
    cam = np.asarray(cam.tolist() if not isinstance(cam, np.ndarray) and hasattr(cam, "tolist") else cam,
                     dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or cam.shape != image.shape[:2]:
        raise ValueError(f"overlay: expected image (H, W, 3) and cam (H, W) of the same H, W; got image "
                         f"{image.shape} and cam {cam.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    heat = colormaps[colormap](np.clip(cam, 0.0, 1.0))[..., :3].astype(np.float32)
    return (1.0 - alpha) * image + alpha * heat


def guided_image(grad, /, *, channels_first: bool | None = None) -> np.ndarray:
    """One sample's guided gradient (``"guided-backprop"``, ``"guided-gradcam"``, ...) as a picture, as the papers'
    figures show it: ``0.5 + 0.1 * (g - mean(g)) / std(g)``, clipped to ``[0, 1]`` (gray where ``g`` is 0 on
    average; a constant ``g`` gives gray).

    Args: ``grad``: ``(C, H, W)`` or ``(H, W, C)`` of any framework; ``channels_first``: its layout (default: the
        axis of size 1 or 3 that the other end does not have). Returns ``(H, W, C)`` float32.
    """
    g = np.asarray(grad.tolist() if not isinstance(grad, np.ndarray) and hasattr(grad, "tolist") else grad,
                   dtype=np.float64)
    if g.ndim != 3:
        raise ValueError(f"grad: expected one sample (C, H, W) or (H, W, C), got shape {g.shape}")
    if channels_first is None:
        channels_first = g.shape[0] in (1, 3) and g.shape[-1] not in (1, 3)
    if channels_first:
        g = np.moveaxis(g, 0, -1)
    std = g.std()
    g = (g - g.mean()) / std if std > 0 else np.zeros_like(g)
    return np.clip(0.5 + 0.1 * g, 0.0, 1.0).astype(np.float32)


def caption(rgb, text: str, /, *, height: int = 24) -> np.ndarray:
    """``(H, W, 3)`` float image in ``[0, 1]`` -> ``(height + H, W, 3)``: ``text`` written on a white band above it
    (OpenCV's Hershey font, shrunk to fit the width)."""
    import cv2

    rgb = np.asarray(rgb, dtype=np.float32)
    band = np.full((height, rgb.shape[1], 3), 255, dtype=np.uint8)  # OpenCV draws text on 8-bit images
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1
    width = cv2.getTextSize(text, font, scale, thickness)[0][0]
    scale *= min(1.0, (rgb.shape[1] - 8) / max(width, 1))
    cv2.putText(band, text, (4, height - 8), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return np.concatenate([band.astype(np.float32) / 255.0, rgb], axis=0)


def png_bytes(rgb) -> bytes:
    """An ``(H, W, 3)`` float image in ``[0, 1]`` encoded as PNG."""
    import io

    from matplotlib import image as mpimg

    buf = io.BytesIO()
    mpimg.imsave(buf, np.clip(np.asarray(rgb, dtype=np.float32), 0.0, 1.0), format="png")
    return buf.getvalue()


def save_png(path, rgb) -> None:
    """Write an ``(H, W, 3)`` float image in ``[0, 1]`` to ``path`` as PNG."""
    with open(path, "wb") as f:
        f.write(png_bytes(rgb))
