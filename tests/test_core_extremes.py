"""The core at float32's extremes (issue 13): hypothesis draws finite float32 arrays whose entries span the whole
range, subnormals to 3.4e38, and every formula must give the float64 oracle's value (to float32's precision,
relative to the result's scale) or, where that value itself lies beyond float32, say so -- never NaN, never a
silent 0. The oracles are float64 NumPy written from the equations; float32 inputs cannot overflow them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from camcore import maps as M
from camcore import perturbation as P
from camcore import weights as W

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_MAX = float(np.finfo(np.float32).max)


def wide(shape, *, min_value=None):
    """float32 arrays of ``shape`` with entries anywhere in float32's finite range (hypothesis favours the ends:
    0, subnormals, the largest values), or only ``>= min_value``."""
    return hnp.arrays(np.float32, shape, elements=st.floats(min_value=min_value, width=32, allow_nan=False,
                                                             allow_infinity=False))


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))


@st.composite
def act_grad(draw, *, nonnegative_a=False):
    s = draw(shapes)
    return draw(wide(s, min_value=0.0 if nonnegative_a else None)), draw(wide(s))


def f64(x):
    return np.asarray(x, np.float64)


def assert_f32_close(actual, expected, scale, rtol=1e-5, floor=1e-44):
    """``actual`` (float32) is ``expected`` (float64) to ``rtol`` of ``scale`` (or ``floor``), per sample and
    channel; where the expected value is beyond float32 (only possible where an oracle sums), ``actual`` is the
    same-signed inf."""
    actual = np.asarray(actual)
    assert not np.isnan(actual).any()
    over = np.abs(expected) > F32_MAX
    np.testing.assert_array_equal(actual[over], np.sign(expected[over]) * np.inf)
    ok = ~over
    assert np.all(np.abs(f64(actual[ok]) - expected[ok]) <= rtol * scale[ok] + floor), \
        (actual[ok], expected[ok], scale[ok])


# -------------------------------------------------------------------------------------- channel weights
@SETTINGS
@given(ag=act_grad())
@example(ag=(np.zeros((1, 1, 2, 2), np.float32), np.full((1, 1, 2, 2), 3e38, np.float32)))
def test_gradcam_is_the_spatial_mean_at_any_magnitude(ag):
    """``mean(G)`` summed 3e38's to inf before; a mean never exceeds the largest entry."""
    a, g = ag
    expected = f64(g).mean(axis=(2, 3))
    assert_f32_close(W.gradcam(a, g), expected, np.abs(f64(g)).max(axis=(2, 3)))


def o_gradcam_pp(a, g, eps):
    """Eq. (19) literally in float64: ``alpha = G^2 / (2 G^2 + S G^3 + eps)``, 0 where G == 0 or that is 0;
    returns ``w`` and the sum of ``|alpha relu(G)|`` terms (the result's scale)."""
    a, g = f64(a), f64(g)
    s = a.sum(axis=(2, 3), keepdims=True)
    den = 2 * g**2 + s * g**3 + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where((g != 0) & (den != 0), g**2 / np.where(den == 0, 1, den), 0.0)
    terms = alpha * np.maximum(g, 0)
    return terms.sum(axis=(2, 3)), np.abs(terms).sum(axis=(2, 3))


@SETTINGS
@given(ag=act_grad(nonnegative_a=True), eps=st.sampled_from([0.0, 1e-6]))
@example(ag=(np.full((1, 1, 2, 2), 1.7e38, np.float32), np.zeros((1, 1, 2, 2), np.float32)), eps=0.0)
@example(ag=(np.full((1, 2, 3, 3), 1e20, np.float32), np.full((1, 2, 3, 3), 1e21, np.float32)), eps=0.0)
def test_gradcam_pp_at_any_magnitude(ag, eps):
    """A = 1.7e38 with G = 0 gave NaN (inf * 0), and ``S * G`` beyond 3.4e38 (the saturated model: A ~ 1e20,
    G ~ 1e21) gave 0 for every channel. Non-negative A, the activations after a ReLU, where no term's
    denominator cancels (with signed A, ``2 + S G`` can cancel to any value, and float32 can only be finite)."""
    a, g = ag
    expected, scale = o_gradcam_pp(a, g, eps)
    # eps > 0 (pytorch-grad-cam's form): a term G^3 / eps below float32's smallest normal number may be 0
    assert_f32_close(W.gradcam_pp(a, g, eps=eps), expected, scale, floor=np.finfo(np.float32).tiny if eps else 1e-44)


@SETTINGS
@given(ag=act_grad(), eps=st.sampled_from([0.0, 1e-6]))
def test_gradcam_pp_signed_activations_never_nan(ag, eps):
    a, g = ag
    assert not np.isnan(np.asarray(W.gradcam_pp(a, g, eps=eps))).any()


@SETTINGS
@given(ag=act_grad(nonnegative_a=True))
def test_xgradcam_at_any_magnitude(ag):
    """``sum(A G) / sum(A)``: a weighted mean of G for non-negative A, so never beyond the largest |G|."""
    a, g = ag
    a64, g64 = f64(a), f64(g)
    s = a64.sum(axis=(2, 3))
    expected = np.where(s > 0, (a64 * g64).sum(axis=(2, 3)) / np.where(s > 0, s, 1), 0.0)
    assert_f32_close(W.xgradcam(a, g), expected, np.abs(g64).max(axis=(2, 3)), rtol=1e-4)


# ----------------------------------------------------------------------------------------- the map steps
@SETTINGS
@given(cam=wide(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))))
@example(cam=np.array([[[-3.3e38, 8e36]]], np.float32))
@example(cam=np.array([[[-3.4e38, 3.4e38]]], np.float32))
def test_normalize_at_any_magnitude(cam):
    """The span ``max - min`` overflowed to inf for maps spanning float32 (and ``(x - min) / inf`` gave 0)."""
    c = f64(cam)
    lo, hi = c.min(axis=(1, 2), keepdims=True), c.max(axis=(1, 2), keepdims=True)
    with np.errstate(invalid="ignore"):
        expected = np.where(hi > lo, (c - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    out = np.asarray(M.normalize(cam))
    assert out.dtype == np.float32 and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@SETTINGS
@given(cam=wide(st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4))),
       size=st.tuples(st.integers(1, 9), st.integers(1, 9)))
@example(cam=np.array([[[-3.4e38, 3.4e38]]], np.float32), size=(1, 5))
def test_upsample_is_a_convex_combination_at_any_magnitude(cam, size):
    """``lo + (hi - lo) t`` overflowed where neighbours have opposite signs near float32's maximum; a linear
    interpolation stays within its sample's range, and matches its float64 self."""
    out = np.asarray(M.upsample(cam, size))
    assert np.isfinite(out).all()
    lo, hi = cam.min(axis=(1, 2), keepdims=True), cam.max(axis=(1, 2), keepdims=True)
    assert np.all((out >= np.nextafter(lo, -np.inf)) & (out <= np.nextafter(hi, np.inf)))  # to one rounding
    flat = np.all(cam == cam[:, :1, :1], axis=(1, 2))
    np.testing.assert_array_equal(out[flat], np.broadcast_to(cam[flat, :1, :1], out[flat].shape))  # exactly
    expected = np.asarray(M.upsample(f64(cam), size))
    np.testing.assert_allclose(f64(out), expected, rtol=0, atol=1e-6 * np.abs(f64(cam)).max() + 1e-44)


@SETTINGS
@given(a=wide(st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))))
def test_score_cam_masks_at_any_magnitude(a):
    """``channel_masks`` is normalize after upsample: masks in [0, 1], finite, one per channel."""
    masks = np.asarray(P.channel_masks(a, (6, 5)))
    assert masks.shape == (a.shape[0], 1, 6, 5) and np.isfinite(masks).all()
    assert masks.min() >= 0 and masks.max() <= 1


@SETTINGS
@given(x=wide(st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(2, 4), st.integers(1, 3))))
def test_principal_component_finite_at_any_magnitude(x):
    """Centring and the energy overflowed to inf near float32's maximum and the SVD never returned (torch raised
    ``LinAlgError``); now finite on NumPy and torch alike, and oriented: non-negative covariance with the energy
    (computed in float64)."""
    p = np.asarray(M.principal_component(x))
    assert p.shape == (x.shape[0], *x.shape[2:]) and np.isfinite(p).all()
    assert torch.isfinite(M.principal_component(torch.from_numpy(x))).all()
    x64 = f64(x)
    energy = (x64 / np.maximum(np.abs(x64).max(axis=(1, 2, 3), keepdims=True), 1e-300)) ** 2
    energy = energy.sum(axis=1).reshape(x.shape[0], -1)
    flat = f64(p).reshape(x.shape[0], -1)
    agreement = ((flat - flat.mean(axis=1, keepdims=True)) * energy).sum(axis=1)
    assert np.all(agreement >= -1e-4 * np.abs(flat).sum(axis=1) * energy.max(axis=1))


def test_extremes_on_torch_stay_on_torch():
    """The range-safe forms are Array-API code: a torch input gives a torch result of its dtype."""
    a = torch.full((1, 2, 3, 3), 1e20)
    g = torch.full((1, 2, 3, 3), 1e21)
    for out in (W.gradcam(a, g), W.gradcam_pp(a, g), W.xgradcam(a, g), M.normalize(a[:, 0]),
                M.upsample(a[:, 0], (5, 5))):
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(W.gradcam_pp(a, g), torch.full((1, 2), 9 / (2 / 1e21 + 9e20)))


def test_normalize_propagates_nan_it_cannot_raise_on():
    """NaN raises where it can be read; the only NaN that reaches the formula is a JAX tracer's, and there it stays
    NaN (before, a NaN map became all zeros: a blank map that looked like an answer)."""
    with pytest.raises(ValueError, match=r"normalize: the maps contain NaN or inf"):
        M.normalize(np.array([[0.0, np.nan]], np.float32))
    jax = pytest.importorskip("jax")
    out = jax.jit(M.normalize)(jax.numpy.asarray([[0.0, 1.0], [0.0, np.nan]]))
    np.testing.assert_array_equal(np.asarray(out[0]), [0.0, 1.0])
    assert np.isnan(np.asarray(out[1])).all()
