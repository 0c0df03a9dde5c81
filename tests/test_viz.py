"""camcore.viz: every framework's arrays in every common image form give the same pictures; overlay blends exactly
``(1 - alpha) * image + alpha * colormap(cam)`` (the map resized to the image); boxes are drawn on exactly their
end-exclusive border pixels; a grid's size is the arithmetic of its cells, pads and text bands; bad inputs get
errors naming the argument. Importing the module loads no framework."""
from __future__ import annotations

import json
import subprocess
import sys

# isort: off
import torch  # torch before tensorflow: the other order can segfault
import tensorflow as tf
import jax.numpy as jnp
# isort: on
import cv2
import numpy as np
import pytest
from matplotlib import colormaps

from camcore import viz
from camcore.demo import OBJECT_BOXES
from camcore.localisation import boxes_from_cam

TOL = 1e-6


@pytest.fixture
def u8():
    """A random uint8 ``(H, W, 3)`` image, H != W so that a transposed layout would show."""
    return np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


@pytest.fixture
def cam():
    return np.random.default_rng(1).random((12, 10)).astype(np.float32)


# --- to_numpy, as_image, as_images -----------------------------------------------------------------------------------

def test_to_numpy_takes_every_framework():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = torch.tensor(a, requires_grad=True) * 2  # a non-leaf tensor in an autograd graph
    for x, expected in [(torch.tensor(a, requires_grad=True), a), (graph, 2 * a), (tf.constant(a), a),
                        (tf.Variable(a), a), (jnp.asarray(a), a), (a.tolist(), a),
                        (torch.tensor(a, dtype=torch.bfloat16), a)]:  # bfloat16: NumPy has no such dtype
        out = viz.to_numpy(x)
        assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(out.astype(np.float32), expected)
    assert viz.to_numpy(a) is a
    with pytest.raises(TypeError, match="expected an array, got"):
        viz.to_numpy(torch.tensor(a, dtype=torch.bfloat16).to_sparse())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_to_numpy_and_overlay_take_a_cuda_tensor(u8, cam):
    x = torch.tensor(u8, device="cuda").permute(2, 0, 1)
    np.testing.assert_array_equal(viz.to_numpy(x), u8.transpose(2, 0, 1))
    m = torch.tensor(cam, device="cuda", requires_grad=True)
    np.testing.assert_allclose(viz.overlay(x, m), viz.overlay(u8, cam), atol=TOL)


def test_as_image_reads_every_form_to_the_same_hwc_float(u8):
    expected = u8.astype(np.float32) / 255
    chw = np.ascontiguousarray(u8.transpose(2, 0, 1))
    forms = [u8, chw, expected, expected.transpose(2, 0, 1), u8.astype(np.float32),  # float 0-255 is divided
             torch.tensor(chw), torch.tensor(expected, requires_grad=True), tf.constant(u8), jnp.asarray(chw),
             u8.tolist()]
    for form in forms:
        out = viz.as_image(form)
        assert out.dtype == np.float32 and out.shape == (12, 10, 3)
        np.testing.assert_allclose(out, expected, atol=TOL)
    gray = u8[..., 0]
    for form in (gray, gray[..., None], gray[None], torch.tensor(gray)):
        np.testing.assert_allclose(viz.as_image(form), np.repeat(expected[..., :1], 3, axis=-1), atol=TOL)
    bools = viz.as_image(gray > 128)
    np.testing.assert_array_equal(bools[..., 1], (gray > 128).astype(np.float32))


def test_as_image_layout_detection_and_override():
    a = np.random.default_rng(0).random((3, 5, 3)).astype(np.float32)  # ambiguous: read as (H, W, C) by default
    np.testing.assert_array_equal(viz.as_image(a), a)
    np.testing.assert_array_equal(viz.as_image(a, channels_first=True), a.transpose(1, 2, 0))
    b = np.random.default_rng(0).random((1, 4, 6)).astype(np.float32)  # (1, H, W): channels-first gray
    np.testing.assert_array_equal(viz.as_image(b), np.repeat(b[0][..., None], 3, axis=-1))


@pytest.mark.parametrize("bad, channels_first, error, match", [
    (np.zeros((1, 3, 4, 4)), None, ValueError, r"image: expected an image \(H, W, 3\).*got shape \(1, 3, 4, 4\)"),
    (np.zeros(5), None, ValueError, r"image: expected an image .* got shape \(5,\)"),
    (np.zeros((0, 4, 3)), None, ValueError, r"H, W >= 1, got shape \(0, 4, 3\)"),
    (np.zeros((4, 4, 2)), None, ValueError, r"image: expected an image with 1 or 3 channels, got shape \(4, 4, 2\)"),
    (np.zeros((4, 4, 4)), None, ValueError, r"drop an alpha channel first"),
    (np.zeros((4, 5, 3)), True, ValueError, r"got shape \(4, 5, 3\) read as channels-first"),
    (np.zeros((3, 4, 5)), False, ValueError, r"got shape \(3, 4, 5\) read as channels-last"),
    (np.full((4, 4, 3), -0.5), None, ValueError,
     r"image: expected pixel values in \[0, 1\] or \[0, 255\] \(or uint8\), got values in \[-0\.5, -0\.5\]; undo a"),
    (np.full((4, 4, 3), 300.0), None, ValueError, r"got values in \[300, 300\]"),
    (np.full((4, 4, 3), np.nan), None, ValueError, r"image: expected finite values, got 48 NaN or inf"),
    (np.full((4, 4, 3), "a"), None, TypeError, r"image: expected an array of numbers, got dtype <U1"),
])
def test_as_image_refuses_what_it_cannot_read(bad, channels_first, error, match):
    with pytest.raises(error, match=match):
        viz.as_image(bad, channels_first=channels_first)


def test_as_images_takes_nchw_nhwc_gray_and_lists(u8):
    batch = np.stack([u8, 255 - u8])  # (2, H, W, 3)
    expected = [u8 / 255, (255 - u8) / 255]
    for form in (batch, torch.tensor(batch).permute(0, 3, 1, 2), tf.constant(batch), jnp.asarray(batch) * 1.0,
                 batch.astype(np.float32) / 255):
        out = viz.as_images(form)
        assert len(out) == 2
        for o, e in zip(out, expected):
            np.testing.assert_allclose(o, e, atol=TOL)
    gray = viz.as_images(batch[..., 0])  # (B, H, W)
    np.testing.assert_allclose(gray[1], np.repeat(expected[1][..., :1], 3, -1), atol=TOL)
    # the 0-255 range is decided for the whole batch: a dark image (max <= 1) in a 0-255 batch is divided too
    dark = np.stack([np.full((2, 2, 3), 200.0), np.full((2, 2, 3), 1.0)])
    np.testing.assert_allclose(viz.as_images(dark)[1], 1 / 255, atol=TOL)
    mixed = viz.as_images([torch.tensor(u8).permute(2, 0, 1), np.ones((3, 5))])  # a list: each its own size
    assert [m.shape for m in mixed] == [(12, 10, 3), (3, 5, 3)]
    with pytest.raises(ValueError, match=r"batch: expected images \(B, C, H, W\).*got shape \(4, 4\)"):
        viz.as_images(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"batch: expected images with 1 or 3 channels, got shape \(4, 4, 5\)"):
        viz.as_images(np.zeros((2, 4, 4, 5)))
    with pytest.raises(ValueError, match=r"batch\[1\]: expected an image"):
        viz.as_images([u8, np.zeros((2, 2, 2, 2))])


# --- overlay ---------------------------------------------------------------------------------------------------------

def test_overlay_is_the_blend_of_image_and_colormap(u8, cam):
    img = u8.astype(np.float32) / 255
    jet = colormaps["jet"](cam)[..., :3]
    out = viz.overlay(img, cam)
    assert out.dtype == np.float32 and out.shape == (12, 10, 3)
    np.testing.assert_allclose(out, 0.55 * img + 0.45 * jet, atol=TOL)
    np.testing.assert_allclose(viz.overlay(img, cam, alpha=0.0), img, atol=TOL)
    np.testing.assert_allclose(viz.overlay(img, cam, alpha=1, colormap="viridis"),
                               colormaps["viridis"](cam)[..., :3], atol=TOL)
    np.testing.assert_allclose(viz.overlay(img, cam * 3 - 1, alpha=1.0),  # the map is clipped to [0, 1]
                               colormaps["jet"](np.clip(cam * 3 - 1, 0, 1))[..., :3], atol=TOL)
    np.testing.assert_allclose(viz.overlay(img, cam[None], alpha=1.0, colormap=colormaps["magma"]),
                               colormaps["magma"](cam)[..., :3], atol=TOL)


def test_overlay_gives_the_same_picture_for_every_framework_and_layout(u8, cam):
    expected = viz.overlay(u8.astype(np.float32) / 255, cam, alpha=0.3, colormap="inferno")
    nchw = torch.tensor(u8).permute(2, 0, 1)[None]  # a torch NCHW uint8 batch of one
    forms = [(nchw[0], torch.tensor(cam, requires_grad=True)), (tf.constant(u8), tf.constant(cam)),
             (jnp.asarray(u8), jnp.asarray(cam)), (u8.astype(np.float64), cam.tolist()),
             (jnp.asarray(u8.transpose(2, 0, 1)) * 1.0, torch.tensor(cam)[None])]
    for image, m in forms:
        np.testing.assert_allclose(viz.overlay(image, m, alpha=0.3, colormap="inferno"), expected, atol=1 / 255)


def test_overlay_resizes_a_smaller_cam_to_the_image(u8):
    img = u8.astype(np.float32) / 255
    half = np.zeros((6, 5), np.float32)
    half[:, :2] = 1.0  # the left 2 of 5 columns hot
    out = viz.overlay(img, half, alpha=1.0)
    assert out.shape == (12, 10, 3)
    full = cv2.resize(half, (10, 12), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(out, colormaps["jet"](full)[..., :3], atol=TOL)
    hot, cold = colormaps["jet"](1.0)[:3], colormaps["jet"](0.0)[:3]
    np.testing.assert_allclose(out[:, :3], np.broadcast_to(hot, (12, 3, 3)), atol=TOL)  # bilinear: the left
    np.testing.assert_allclose(out[:, 6:], np.broadcast_to(cold, (12, 4, 3)), atol=TOL)  # and right stay pure
    np.testing.assert_allclose(viz.overlay(img, np.full((3, 20), 0.25), alpha=1.0),  # and an upsampled constant
                               np.broadcast_to(colormaps["jet"](0.25)[:3], (12, 10, 3)), atol=TOL)


def test_overlay_refuses_bad_inputs(u8, cam):
    with pytest.raises(ValueError, match=r"colormap: expected a matplotlib colormap name \(e\.g\. 'jet', "
                                         r"'viridis'.*got 'nope'"):
        viz.overlay(u8, cam, colormap="nope")
    for alpha in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"alpha: expected a value in \[0, 1\], got"):
            viz.overlay(u8, cam, alpha=alpha)
    with pytest.raises(ValueError, match=r"cam: expected one map \(H, W\) or \(1, H, W\).*got shape \(2, 12, 10\)"):
        viz.overlay(u8, np.zeros((2, 12, 10)))
    with pytest.raises(ValueError, match=r"cam: expected finite values, got 1 NaN"):
        viz.overlay(u8, np.where(cam == cam.max(), np.nan, cam))
    with pytest.raises(ValueError, match=r"image: expected an image"):
        viz.overlay(u8[None], cam)


# --- guided_image ----------------------------------------------------------------------------------------------------

def test_guided_image_normalises_any_framework_and_layout():
    g = np.random.default_rng(2).normal(size=(3, 6, 5))
    hwc = g.transpose(1, 2, 0)
    expected = np.clip(0.5 + 0.1 * (hwc - hwc.mean()) / hwc.std(), 0, 1)
    for form in (g, hwc, torch.tensor(g, requires_grad=True), tf.constant(g), jnp.asarray(g, dtype=jnp.float32)):
        np.testing.assert_allclose(viz.guided_image(form), expected, atol=1e-5)
    np.testing.assert_allclose(viz.guided_image(g.transpose(1, 2, 0)[:3, :3], channels_first=True),
                               np.clip(0.5 + 0.1 * (hwc[:3, :3].transpose(1, 2, 0) - hwc[:3, :3].mean())
                                       / hwc[:3, :3].std(), 0, 1), atol=1e-5)
    np.testing.assert_array_equal(viz.guided_image(np.full((3, 4, 4), 7.0)), 0.5)  # constant: gray
    with pytest.raises(ValueError, match=r"grad: expected one sample \(C, H, W\) or \(H, W, C\), got shape"):
        viz.guided_image(np.zeros((1, 3, 4, 4)))


# --- draw_boxes ------------------------------------------------------------------------------------------------------

def _border(h, w, box, t):
    """The mask of the outermost ``t`` pixels inside an end-exclusive box (computed from the box's pixel set)."""
    x0, y0, x1, y1 = box
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    core = np.zeros((h, w), bool)
    core[y0 + t:y1 - t, x0 + t:x1 - t] = True
    return inside & ~core, core


def test_draw_boxes_colours_exactly_the_border_pixels(u8):
    img = u8.astype(np.float32) / 255
    for box, t in [((2, 3, 8, 10), 1), ((1, 1, 9, 11), 2), ((4, 4, 5, 5), 1), ((0, 0, 10, 12), 3)]:
        out = viz.draw_boxes(img, box, color=(1, 0, 0.5), thickness=t)
        border, _ = _border(12, 10, box, t)
        np.testing.assert_array_equal(out[border], np.broadcast_to([1, 0, 0.5], (border.sum(), 3)))
        np.testing.assert_array_equal(out[~border], img[~border])  # interior and outside untouched
    np.testing.assert_array_equal(img, u8.astype(np.float32) / 255)  # the input is not modified


def test_draw_boxes_several_boxes_colours_and_frameworks(u8):
    img = u8.astype(np.float32) / 255
    boxes = [(0, 0, 4, 4), (5, 6, 10, 12)]
    colors = [(1, 0, 0), (0, 0, 1)]
    expected = viz.draw_boxes(viz.draw_boxes(img, boxes[0], color=colors[0], thickness=1), boxes[1],
                              color=colors[1], thickness=1)
    for b in (boxes, np.array(boxes), torch.tensor(boxes), tf.constant(boxes), jnp.asarray(boxes, dtype=jnp.float32)):
        np.testing.assert_array_equal(viz.draw_boxes(torch.tensor(u8).permute(2, 0, 1), b, color=colors,
                                                      thickness=1), expected)
    green = viz.draw_boxes(img, boxes[1], thickness=1)  # the default colour
    np.testing.assert_array_equal(green[6, 7], [0, 1, 0])
    assert viz.draw_boxes(img, np.zeros((0, 4))).tolist() == img.tolist()  # no boxes: the image


def test_draw_boxes_follows_the_localisation_convention(photos):
    """A box from camcore.localisation (end-exclusive) is drawn on its own pixels: boxes_from_cam of a map that is
    1 on exactly the pixels of a demo box gives that box back, and its border lies on those pixels."""
    x0, y0, x1, y1 = OBJECT_BOXES["rocket"]
    m = np.zeros((1, 224, 224))
    m[0, y0:y1, x0:x1] = 1.0
    box = boxes_from_cam(m)[0]
    assert tuple(box.tolist()) == (x0, y0, x1, y1)
    out = viz.draw_boxes(photos[3], box, thickness=1)
    border, _ = _border(224, 224, (x0, y0, x1, y1), 1)
    assert (out[border] == [0, 1, 0]).all()
    np.testing.assert_array_equal(out[~border], photos[3][~border])


def test_draw_boxes_clips_to_the_image(u8):
    img = u8.astype(np.float32) / 255
    out = viz.draw_boxes(img, (-5, -3, 6, 20), color=(1, 1, 1), thickness=1)  # cut at the left, top and bottom
    border, _ = _border(12, 10, (0, 0, 6, 12), 1)
    np.testing.assert_array_equal(out[border], 1.0)
    np.testing.assert_array_equal(out[~border], img[~border])
    np.testing.assert_array_equal(viz.draw_boxes(img, (20, 0, 30, 5), labels=["far"]), img)  # wholly outside
    np.testing.assert_array_equal(viz.draw_boxes(img, (-4, -4, 100, 100), thickness=1),
                                  viz.draw_boxes(img, (0, 0, 10, 12), thickness=1))


def test_draw_boxes_writes_labels_above_the_box():
    img = np.full((60, 80, 3), 0.5, np.float32)
    plain = viz.draw_boxes(img, (10, 30, 70, 55), color=(1, 1, 0), thickness=1)
    out = viz.draw_boxes(img, (10, 30, 70, 55), color=(1, 1, 0), thickness=1, labels=["cat"])
    changed = (out != plain).any(-1)
    ys, xs = np.nonzero(changed)
    assert ys.max() < 30 and xs.min() >= 10  # the label band lies above the box, from its left edge
    band = out[ys.min():30, 10:xs.max() + 1]
    assert np.isclose(band, [1, 1, 0]).all(-1).mean() > 0.5  # a band of the box's colour
    assert (band.max(-1) < 0.3).any()  # with dark text on the light yellow
    np.testing.assert_array_equal(out[30:], plain[30:])  # the box and below unchanged
    top = viz.draw_boxes(img, (10, 0, 70, 40), color=(0, 0, 1), thickness=1, labels="top")  # no room above
    changed = (top != viz.draw_boxes(img, (10, 0, 70, 40), color=(0, 0, 1), thickness=1)).any(-1)
    assert changed.any() and np.nonzero(changed)[0].max() < 40  # inside the box's top
    assert (top[changed].min(-1) > 0.7).any()  # white text on the dark blue


@pytest.mark.parametrize("kwargs, match", [
    ({"boxes": [(0, 0, 4, 4), (5, 1, 5, 3)]},
     r"boxes\[1\]: expected \(x0, y0, x1, y1\) with x0 < x1 and y0 < y1 \(end-exclusive pixels\), got \(5, 1, 5, 3\)"),
    ({"boxes": (2, 6, 4, 1)}, r"boxes\[0\]: expected .* got \(2, 6, 4, 1\)"),
    ({"boxes": [(0, 0, 4)]}, r"boxes: expected one box \(x0, y0, x1, y1\) or boxes \(N, 4\), got shape \(1, 3\)"),
    ({"boxes": (0, 0, np.nan, 4)}, r"boxes: expected finite values"),
    ({"boxes": (0, 0, 4, 4), "thickness": 0}, r"thickness: expected an integer >= 1, got 0"),
    ({"boxes": (0, 0, 4, 4), "thickness": 1.5}, r"thickness: expected an integer >= 1, got 1\.5"),
    ({"boxes": (0, 0, 4, 4), "color": (0, 255, 0)},
     r"color: expected .* in \[0, 1\], got \[0\.0, 255\.0, 0\.0\]; divide"),
    ({"boxes": [(0, 0, 4, 4)] * 2, "color": [(1, 0, 0)] * 3},
     r"color: expected one RGB colour .* or one per box \(2, 3\)"),
    ({"boxes": [(0, 0, 4, 4)] * 2, "labels": ["a"]}, r"labels: expected one label per box \(2\), got 1"),
])
def test_draw_boxes_refuses_malformed_input(u8, kwargs, match):
    boxes = kwargs.pop("boxes")
    with pytest.raises(ValueError, match=match):
        viz.draw_boxes(u8, boxes, **kwargs)


# --- grid ------------------------------------------------------------------------------------------------------------

def test_grid_size_is_the_arithmetic_of_cells_pads_and_bands(u8):
    a, b = u8.astype(np.float32) / 255, np.zeros((12, 10, 3), np.float32)
    cells = [[a, b, a], [b, None, a]]
    h, w = 12, 10
    for kwargs, bands in [({}, 0), ({"title": "t"}, 1), ({"column_labels": ["x", "y", "z"]}, 1),
                          ({"row_labels": ["r0", "r1"]}, 2),
                          ({"title": "t", "column_labels": ["x", None, "z"], "row_labels": ["r0", "r1"]}, 4)]:
        for pad in (0, 4, 7):
            out = viz.grid(cells, pad=pad, **kwargs)
            assert out.dtype == np.float32
            assert out.shape == (bands * 24 + 2 * (pad + h) + pad, 3 * w + 4 * pad, 3), (kwargs, pad)


def test_grid_places_each_cell_exactly_and_blanks_are_white(u8):
    a = np.tile(u8.astype(np.float32) / 255, (1, 4, 1))  # (12, 40, 3): room for a label
    b = 1 - a
    pad = 3
    out = viz.grid([[a, b], [None, a]], row_labels=["first", "second"], column_labels=["A", "B"], title="T", pad=pad)
    y = 24 + 24  # the title and the column labels
    for i, row in enumerate([[a, b], [None, a]]):
        y += pad
        band = out[y:y + 24]
        assert (band.max(-1) < 0.5).mean() > 0.01  # the row's label: dark text on white
        y += 24
        for j, cell in enumerate(row):
            x = pad + j * (40 + pad)
            expected = np.ones_like(a) if cell is None else cell
            np.testing.assert_array_equal(out[y:y + 12, x:x + 40], expected, err_msg=f"cell {i}, {j}")
        y += 12
    assert y + pad == out.shape[0]
    np.testing.assert_array_equal(out[:, :pad][48:], 1.0)  # the pads are white
    for j in range(2):  # each column's label is written over its own column only
        x = pad + j * (40 + pad)
        assert (out[24:48, x:x + 40].max(-1) < 0.5).any()
        np.testing.assert_array_equal(out[24:48, x + 40:x + 40 + pad], 1.0)
    assert (out[:24].max(-1) < 0.5).any()  # the title
    np.testing.assert_array_equal(viz.grid([[a]], pad=0), a)


def test_grid_resizes_cells_to_the_first_and_takes_any_framework(u8):
    a = u8.astype(np.float32) / 255
    big = np.random.default_rng(3).random((24, 20, 3)).astype(np.float32)
    out = viz.grid([[None, torch.tensor(u8).permute(2, 0, 1)], [tf.constant(big), jnp.asarray(a)], [a]], pad=2)
    assert out.shape == (3 * (2 + 12) + 2, 2 * 10 + 3 * 2, 3)
    np.testing.assert_allclose(out[2 + 14:2 + 14 + 12, 2:12], cv2.resize(big, (10, 12), interpolation=cv2.INTER_AREA),
                               atol=TOL)
    np.testing.assert_allclose(out[2:14, 14:24], a, atol=TOL)  # the first picture sets the size (after a blank)
    np.testing.assert_array_equal(out[2 + 28:2 + 28 + 12, 14:24], 1.0)  # a short row ends in blank cells


@pytest.mark.parametrize("pictures, kwargs, error, match", [
    ([], {}, ValueError, r"pictures: expected a non-empty list of rows .* got an empty list"),
    (np.zeros((2, 4, 4, 3)), {}, TypeError, r"pictures: expected a list of rows .* got ndarray"),
    ([np.zeros((4, 4, 3))], {}, TypeError,
     r"pictures\[0\]: expected a row \(a list of images or None\), got ndarray; give one row as \[\[image, image"),
    ([[None], [None, None]], {}, ValueError, r"pictures: expected at least one image, got only blank cells"),
    ([[np.zeros((4, 4, 3))], [np.zeros((4, 4, 2))]], {}, ValueError, r"pictures\[1\]\[0\]: expected an image"),
    ([[np.zeros((4, 4, 3))]] * 2, {"row_labels": ["a"]}, ValueError, r"row_labels: expected one label per row \(2\)"),
    ([[np.zeros((4, 4, 3))] * 3], {"column_labels": ["a", "b"]}, ValueError,
     r"column_labels: expected one label per column \(3\), got 2"),
    ([[np.zeros((4, 4, 3))]], {"pad": -1}, ValueError, r"pad: expected an integer >= 0, got -1"),
    ([[np.zeros((4, 4, 3))]], {"title": 3}, TypeError, r"title: expected a string or None, got int"),
    ([[np.zeros((4, 4, 3))]], {"column_labels": [1]}, TypeError, r"column_labels\[0\]: expected a string"),
])
def test_grid_refuses_bad_input(pictures, kwargs, error, match):
    with pytest.raises(error, match=match):
        viz.grid(pictures, **kwargs)


# --- caption, PNG, import --------------------------------------------------------------------------------------------

def test_caption_and_png_round_trip(tmp_path, u8):
    from matplotlib import image

    pic = viz.caption(viz.draw_boxes(u8, (1, 1, 9, 11)), "cat")
    assert pic.shape == (24 + 12, 10, 3)
    viz.save_png(tmp_path / "p.png", pic)
    back = image.imread(tmp_path / "p.png")[..., :3]
    np.testing.assert_allclose(back, pic, atol=0.5 / 255 + TOL)


def test_importing_viz_loads_no_framework():
    probe = ("import json, sys, numpy as np; import camcore.viz as v; "
             "before = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorflow', 'jax', 'keras', "
             "'matplotlib', 'cv2'}); "
             "v.grid([[v.overlay(np.zeros((4, 4, 3), np.uint8), np.ones((2, 2))), v.draw_boxes(np.zeros((4, 4)), "
             "(0, 0, 2, 2), labels=['a'])]], title='t'); "
             "after = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorflow', 'jax', 'keras'}); "
             "print(json.dumps([before, after]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]
