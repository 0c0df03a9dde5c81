"""Visualisation: a map laid over its image as a heat-map, a guided gradient as a picture, boxes drawn on an image,
a captioned grid of images x methods, written as PNG. Needs ``matplotlib`` and ``opencv-python-headless`` (extra
``viz``), imported only when a function needs them; no deep-learning framework is ever imported.

Every function takes arrays of any framework (NumPy, torch, also with ``requires_grad`` or on a GPU, TensorFlow,
JAX, nested lists) and images in any common form (:func:`as_image`): ``(H, W, 3)`` or ``(3, H, W)``, gray
``(H, W)``, ``(H, W, 1)`` or ``(1, H, W)``; uint8 in ``0-255``, floats in ``0-1`` or in ``0-255``. Pictures come back
as ``(H, W, 3)`` float32 in ``[0, 1]``.

- :func:`to_numpy`, :func:`as_image`, :func:`as_images`: arrays and images (and batches) in one form.
- :func:`overlay`: a ``(H, W)`` map blended over its image through a colormap (the map resized to the image).
- :func:`guided_image`: a guided gradient (guided backprop, guided Grad-CAM) shown as the papers show it.
- :func:`draw_boxes`: boxes ``(x0, y0, x1, y1)``, end-exclusive (as :mod:`camcore.localisation`), with labels.
- :func:`grid`: rows x columns of pictures with column and row labels and a title.
- :func:`caption`, :func:`png_bytes`, :func:`save_png`: a text band above a picture; PNG encoding.
"""
from __future__ import annotations

import numpy as np

__all__ = ["to_numpy", "as_image", "as_images", "overlay", "guided_image", "draw_boxes", "grid", "caption",
           "save_png", "png_bytes", "jpeg_bytes"]

_BAND = 24  # the height of a text band (caption's default)


def to_numpy(x) -> np.ndarray:
    """An array of any framework as NumPy, without importing the framework: torch tensors leave the graph and the
    device first (``.detach().cpu()``); TensorFlow, JAX and others through ``__array__`` (or ``.numpy()``); dtypes
    NumPy lacks (torch's bfloat16) through ``.tolist()``; lists and scalars through ``np.asarray``."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch: leave the autograd graph and the GPU
        x = x.detach().cpu()
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as err:
        for attr in ("numpy", "tolist"):
            if hasattr(x, attr):
                try:
                    return np.asarray(getattr(x, attr)())
                except (TypeError, ValueError, RuntimeError):
                    pass
        raise TypeError(f"expected an array, got {type(x).__name__} ({err})") from None


def _floats(x, name: str) -> np.ndarray:
    """``x`` as a finite float32 NumPy array (uint8 and bool as they are: scaled by the caller)."""
    a = to_numpy(x)
    if a.dtype.kind in "OSUMm":
        raise TypeError(f"{name}: expected an array of numbers, got dtype {a.dtype}")
    try:
        f = a.astype(np.float32)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected an array of numbers, got dtype {a.dtype} ({err})") from None
    if f.size and not np.isfinite(f).all():
        raise ValueError(f"{name}: expected finite values, got {int((~np.isfinite(f)).sum())} NaN or inf")
    return f


def _unit_range(a: np.ndarray, f: np.ndarray, name: str) -> np.ndarray:
    """The pixel values ``f`` (float32 of ``a``) scaled to ``[0, 1]``: uint8 and floats above 1 divided by 255."""
    if a.dtype == np.uint8:
        return f / 255.0
    if a.dtype == np.bool_ or f.size == 0:
        return f
    lo, hi = float(f.min()), float(f.max())
    if lo < -1e-3 or hi > 255.5:
        raise ValueError(f"{name}: expected pixel values in [0, 1] or [0, 255] (or uint8), got values in "
                         f"[{lo:.4g}, {hi:.4g}]; undo a normalisation first (x * std + mean)")
    return np.clip(f / 255.0 if hi > 1.0 else f, 0.0, 1.0)


def _layout(shape: tuple, channels_first: bool | None, name: str, what: str) -> bool:
    """Whether an image of ``shape = (a, b, c)`` is channels-first: given, or the axis of size 1 or 3 at the front
    that the end does not have."""
    front, back = shape[0] in (1, 3), shape[-1] in (1, 3)
    if channels_first is None:
        channels_first = front and not back
    if (channels_first and not front) or (not channels_first and not back):
        hint = "; drop an alpha channel first (image[..., :3])" if 4 in (shape[0], shape[-1]) else ""
        layout = "channels-first (C, H, W)" if channels_first else "channels-last (H, W, C)"
        raise ValueError(f"{name}: expected {what} with 1 or 3 channels, got shape {shape} read as {layout}{hint}")
    return bool(channels_first)


def _rgb(f: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 1 | 3)`` -> contiguous ``(H, W, 3)`` float32."""
    if f.ndim == 2:
        f = f[..., None]
    if f.shape[-1] == 1:
        f = np.repeat(f, 3, axis=-1)
    return np.ascontiguousarray(f, dtype=np.float32)


def _image(image, name: str, channels_first: bool | None = None) -> np.ndarray:
    a = to_numpy(image)
    if a.ndim not in (2, 3) or 0 in a.shape:
        raise ValueError(f"{name}: expected an image (H, W, 3), (3, H, W), (H, W), (H, W, 1) or (1, H, W) with "
                         f"H, W >= 1, got shape {tuple(a.shape)}")
    f = _floats(a, name)
    if f.ndim == 3 and _layout(f.shape, channels_first, name, "an image"):
        f = np.moveaxis(f, 0, -1)
    return _rgb(_unit_range(a, f, name))


def as_image(image, /, *, channels_first: bool | None = None) -> np.ndarray:
    """One image of any framework and form -> ``(H, W, 3)`` float32 in ``[0, 1]``.

    Args: ``image``: ``(H, W, 3)``, ``(3, H, W)``, gray ``(H, W)``, ``(H, W, 1)`` or ``(1, H, W)``; uint8 (divided
        by 255), floats in ``[0, 1]``, or floats in ``[0, 255]``: a float image whose maximum is above 1 is divided
        by 255. ``channels_first``: its layout (default: channels-first when the first axis has size 1 or 3 and the
        last does not). Gray images are repeated on 3 channels.
    Raises ValueError for other shapes, NaN or inf, and values outside ``[0, 255]`` (e.g. a normalised image).
    """
    return _image(image, "image", channels_first)


def as_images(batch, /, *, channels_first: bool | None = None) -> list[np.ndarray]:
    """A batch of images -> a list of ``B`` ``(H, W, 3)`` float32 images in ``[0, 1]``.

    Args: ``batch``: ``(B, C, H, W)`` or ``(B, H, W, C)`` with ``C`` 1 or 3 (layout detected from ``C`` as in
        :func:`as_image`, or given by ``channels_first``), or ``(B, H, W)`` gray (a 3-D array is always a batch),
        of any framework; or a list of images of any sizes (each read by :func:`as_image`). The 0-255 or 0-1 range
        is decided for the whole batch at once.
    """
    if isinstance(batch, (list, tuple)) and all(hasattr(b, "shape") for b in batch):
        return [_image(b, f"batch[{i}]", channels_first) for i, b in enumerate(batch)]
    a = to_numpy(batch)
    if a.ndim not in (3, 4) or 0 in a.shape[1:]:
        raise ValueError(f"batch: expected images (B, C, H, W), (B, H, W, C) or (B, H, W) with H, W >= 1, got "
                         f"shape {tuple(a.shape)}")
    f = _floats(a, "batch")
    if f.ndim == 4 and _layout(f.shape[1:], channels_first, "batch", "images"):
        f = np.moveaxis(f, 1, -1)
    f = _unit_range(a, f, "batch")
    return [_rgb(im) for im in f]


def _colormap(colormap):
    from matplotlib import colormaps

    if not isinstance(colormap, str) and callable(colormap):  # a matplotlib Colormap
        return colormap
    try:
        return colormaps[colormap]
    except (KeyError, TypeError):
        raise ValueError(f"colormap: expected a matplotlib colormap name (e.g. 'jet', 'viridis', 'inferno', "
                         f"'magma', 'turbo', 'gray'), got {colormap!r}") from None


def overlay(image, cam, /, *, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """Blend a map over its image: ``(1 - alpha) * image + alpha * colormap(clip(cam, 0, 1))``.

    Args: ``image``: any form of :func:`as_image` (any framework, HWC or CHW, gray, uint8 or 0-1 or 0-255 floats);
        ``cam``: ``(H, W)`` or ``(1, H, W)`` of any framework, values in ``[0, 1]`` (clipped); a map of another size
        than the image is resized to it (bilinear, ``cv2.resize``); ``alpha``: the map's opacity in ``[0, 1]``;
        ``colormap``: a matplotlib colormap name (or a ``Colormap``).
    Returns ``(H, W, 3)`` float32 in ``[0, 1]``.
    """
    img = _image(image, "image")
    m = _floats(cam, "cam")
    if m.ndim == 3 and 1 in (m.shape[0], m.shape[-1]):
        m = m[0] if m.shape[0] == 1 else m[..., 0]
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"cam: expected one map (H, W) or (1, H, W) with H, W >= 1, got shape {tuple(m.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha!r}")
    cmap = _colormap(colormap)
    h, w = img.shape[:2]
    if m.shape != (h, w):
        import cv2

        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    heat = np.asarray(cmap(np.clip(m, 0.0, 1.0)), dtype=np.float32)[..., :3]
    return ((1.0 - alpha) * img + alpha * heat).astype(np.float32)


def guided_image(grad, /, *, channels_first: bool | None = None) -> np.ndarray:
    """One sample's guided gradient (``"guided-backprop"``, ``"guided-gradcam"``, ...) as a picture, as the papers'
    figures show it: ``0.5 + 0.1 * (g - mean(g)) / std(g)``, clipped to ``[0, 1]`` (gray where ``g`` is 0 on
    average; a constant ``g`` gives gray).

    Args: ``grad``: ``(C, H, W)`` or ``(H, W, C)`` of any framework; ``channels_first``: its layout (default: the
        axis of size 1 or 3 that the other end does not have). Returns ``(H, W, C)`` float32.
    """
    g = _floats(grad, "grad").astype(np.float64)
    if g.ndim != 3:
        raise ValueError(f"grad: expected one sample (C, H, W) or (H, W, C), got shape {g.shape}")
    if channels_first is None:
        channels_first = g.shape[0] in (1, 3) and g.shape[-1] not in (1, 3)
    if channels_first:
        g = np.moveaxis(g, 0, -1)
    std = g.std()
    g = (g - g.mean()) / std if std > 0 else np.zeros_like(g)
    return np.clip(0.5 + 0.1 * g, 0.0, 1.0).astype(np.float32)


def _colors(color, n: int) -> np.ndarray:
    """``color``: one RGB ``(3,)`` or one per box ``(n, 3)``, in ``[0, 1]`` -> float32 ``(n, 3)``."""
    given = _floats(color, "color")
    c = np.broadcast_to(given, (n, 3)) if given.shape == (3,) else given
    if c.shape != (n, 3) or (c < 0).any() or (c > 1).any():
        hint = "; divide 0-255 colours by 255" if c.size and c.max() > 1 else ""
        raise ValueError(f"color: expected one RGB colour (r, g, b) or one per box ({n}, 3), in [0, 1], got "
                         f"{np.round(given, 4).tolist()}{hint}")
    return c


def _text_mask(shape: tuple[int, int], text: str, org: tuple[int, int], scale: float) -> np.ndarray:
    """A float32 ``(H, W)`` coverage mask in ``[0, 1]`` of ``text`` written at ``org`` (its baseline's left end)."""
    import cv2

    mask = np.zeros(shape, dtype=np.uint8)
    cv2.putText(mask, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 1, cv2.LINE_AA)
    return mask.astype(np.float32) / 255.0


def draw_boxes(image, boxes, /, *, color=(0, 1, 0), thickness: int = 2, labels=None) -> np.ndarray:
    """Boxes drawn on an image (e.g. the ground truth and the CAM's box of :mod:`camcore.localisation`).

    Args: ``image``: any form of :func:`as_image`; ``boxes``: one ``(x0, y0, x1, y1)`` or ``(N, 4)``, of any
        framework, in pixels, END-EXCLUSIVE (the box holds ``x0 <= x < x1``, ``y0 <= y < y1``; rounded to whole
        pixels); each is clipped to the image and its border drawn on the clipped box's outermost ``thickness``
        pixels, inside it (a box wholly outside the image draws nothing); ``color``: RGB in ``[0, 1]``, one or one
        per box; ``labels``: ``None`` or one string per box, written (black or white) on a band of the box's colour
        just above the box (inside its top where the image has no room above).
    Returns a new ``(H, W, 3)`` float32 picture in ``[0, 1]``.
    """
    import cv2

    out = _image(image, "image").copy()
    h, w = out.shape[:2]
    b = _floats(boxes, "boxes").astype(np.float64)
    if b.ndim == 1 and b.shape == (4,):
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes: expected one box (x0, y0, x1, y1) or boxes (N, 4), got shape {tuple(b.shape)}")
    b = np.round(b).astype(np.int64)
    for i, (x0, y0, x1, y1) in enumerate(b.tolist()):
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"boxes[{i}]: expected (x0, y0, x1, y1) with x0 < x1 and y0 < y1 (end-exclusive "
                             f"pixels), got {(x0, y0, x1, y1)}")
    if isinstance(thickness, bool) or not isinstance(thickness, (int, np.integer)) or thickness < 1:
        raise ValueError(f"thickness: expected an integer >= 1, got {thickness!r}")
    colors = _colors(color, len(b))
    if labels is not None:
        labels = [labels] if isinstance(labels, str) else list(labels)
        if len(labels) != len(b):
            raise ValueError(f"labels: expected one label per box ({len(b)}), got {len(labels)}")
    t = int(thickness)
    for i, ((x0, y0, x1, y1), c) in enumerate(zip(b.tolist(), colors)):
        x0, x1, y0, y1 = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
        if x1 <= x0 or y1 <= y0:  # wholly outside the image
            continue
        out[y0:min(y0 + t, y1), x0:x1] = c
        out[max(y1 - t, y0):y1, x0:x1] = c
        out[y0:y1, x0:min(x0 + t, x1)] = c
        out[y0:y1, max(x1 - t, x0):x1] = c
        if labels is None or not labels[i]:
            continue
        text, scale = str(labels[i]), 0.4
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        lh = th + base + 3
        top = y0 - lh if y0 - lh >= 0 else y0  # above the box, else inside its top
        band = (slice(top, min(top + lh, h)), slice(x0, min(x0 + tw + 4, w)))
        out[band] = c
        ink = 0.0 if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 0.5 else 1.0  # dark text on light colours
        m = _text_mask((h, w), text, (x0 + 2, top + lh - base - 1), scale)[..., None]
        m[:band[0].start] = m[band[0].stop:] = 0.0
        m[:, :band[1].start] = m[:, band[1].stop:] = 0.0
        out = out * (1.0 - m) + ink * m
    return out.astype(np.float32)


def _label(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string or None, got {type(value).__name__}")
    return value


def _labels(labels, n: int, name: str, what: str) -> list[str] | None:
    if labels is None:
        return None
    labels = [labels] if isinstance(labels, str) else list(labels)
    if len(labels) != n:
        raise ValueError(f"{name}: expected one label per {what} ({n}), got {len(labels)}")
    return [_label(s, f"{name}[{i}]") for i, s in enumerate(labels)]


def grid(pictures, /, *, row_labels=None, column_labels=None, title: str | None = None, pad: int = 4) -> np.ndarray:
    """Rows x columns of pictures (e.g. images x methods) on white, with labels, as one picture.

    Args: ``pictures``: a list of rows, each a list of images (any form of :func:`as_image`) or ``None`` (a blank
        cell); shorter rows end in blank cells. Every cell takes the size ``(h, w)`` of the first picture (the
        others resized, ``cv2.INTER_AREA``). ``column_labels``: one per column, written on a band above the grid,
        over its column; ``row_labels``: one per row, written on a band above the row; ``title``: a band above
        everything; ``pad``: white pixels between and around the cells. Labels may be ``None`` (no text).
    Returns ``(H, W, 3)`` float32 in ``[0, 1]`` with ``W = C * w + (C + 1) * pad`` and
    ``H = t + c + R * (pad + r + h) + pad``, where ``t``, ``c``, ``r`` are 24 (the text band) when a title,
    column labels, row labels are given, else 0.
    """
    import cv2

    if isinstance(pictures, np.ndarray) or not isinstance(pictures, (list, tuple)):
        raise TypeError(f"pictures: expected a list of rows (lists of images or None), got "
                        f"{type(pictures).__name__}")
    if not pictures:
        raise ValueError("pictures: expected a non-empty list of rows (lists of images or None), got an empty list")
    rows = []
    for i, row in enumerate(pictures):
        if not isinstance(row, (list, tuple)):
            raise TypeError(f"pictures[{i}]: expected a row (a list of images or None), got "
                            f"{type(row).__name__}; give one row as [[image, image, ...]]")
        rows.append([None if p is None else _image(p, f"pictures[{i}][{j}]") for j, p in enumerate(row)])
    first = next((p for row in rows for p in row if p is not None), None)
    if first is None:
        raise ValueError("pictures: expected at least one image, got only blank cells (None)")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad: expected an integer >= 0, got {pad!r}")
    n_rows, n_cols, pad = len(rows), max(len(row) for row in rows), int(pad)
    row_labels = _labels(row_labels, n_rows, "row_labels", "row")
    column_labels = _labels(column_labels, n_cols, "column_labels", "column")
    title = _label(title, "title")
    h, w = first.shape[:2]
    width = n_cols * w + (n_cols + 1) * pad

    def band(text: str, span: int) -> np.ndarray:
        return caption(np.zeros((0, span, 3), np.float32), text) if text else np.ones((_BAND, span, 3), np.float32)

    def hpad(height: int) -> np.ndarray:
        return np.ones((height, pad, 3), np.float32)

    parts = []
    if title:
        parts.append(band(title, width))
    if column_labels is not None:
        strip = [hpad(_BAND)]
        for text in column_labels:
            strip += [band(text, w), hpad(_BAND)]
        parts.append(np.concatenate(strip, axis=1))
    for i, row in enumerate(rows):
        parts.append(np.ones((pad, width, 3), np.float32))
        if row_labels is not None:
            parts.append(band(row_labels[i], width))
        strip = [hpad(h)]
        for j in range(n_cols):
            p = row[j] if j < len(row) else None
            if p is None:
                p = np.ones((h, w, 3), np.float32)
            elif p.shape[:2] != (h, w):
                p = cv2.resize(p, (w, h), interpolation=cv2.INTER_AREA)
            strip += [p, hpad(h)]
        parts.append(np.concatenate(strip, axis=1))
    parts.append(np.ones((pad, width, 3), np.float32))
    return np.clip(np.concatenate(parts, axis=0), 0.0, 1.0).astype(np.float32)


def caption(rgb, text: str, /, *, height: int = 24) -> np.ndarray:
    """``(H, W, 3)`` float image in ``[0, 1]`` -> ``(height + H, W, 3)``: ``text`` written on a white band above it
    (OpenCV's Hershey font, shrunk to fit the width)."""
    import cv2

    rgb = np.asarray(to_numpy(rgb), dtype=np.float32)
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
    mpimg.imsave(buf, np.clip(np.asarray(to_numpy(rgb), dtype=np.float32), 0.0, 1.0), format="png")
    return buf.getvalue()


def jpeg_bytes(rgb, *, quality: int = 90) -> bytes:
    """An ``(H, W, 3)`` float image in ``[0, 1]`` encoded as JPEG (a tenth of a PNG's size for photos and
    overlays; what the HTML report embeds)."""
    import io

    from PIL import Image

    rgb = np.clip(np.asarray(to_numpy(rgb), dtype=np.float32), 0.0, 1.0)
    buf = io.BytesIO()
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(buf, format="jpeg", quality=quality)
    return buf.getvalue()


def save_png(path, rgb) -> None:
    """Write an ``(H, W, 3)`` float image in ``[0, 1]`` to ``path`` as PNG."""
    with open(path, "wb") as f:
        f.write(png_bytes(rgb))
