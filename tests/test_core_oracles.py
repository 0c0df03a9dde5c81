"""Independent NumPy oracles for every formula of camcore's Array-API core.

Each oracle below is written from the paper's equation (or the documented contract) with explicit float64
loops / NumPy, never calling camcore. The comparisons run on three array namespaces: NumPy (through
array_api_compat), array_api_strict (proves the core uses only the Array-API standard) and PyTorch.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import array_api_strict
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import camcore
from camcore import maps as M
from camcore import weights as W

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------- namespaces
def _np_to(a):
    return np.asarray(a)


def _strict_to(a):
    return array_api_strict.asarray(np.asarray(a))


def _torch_to(a):
    return torch.asarray(np.asarray(a))


NAMESPACES = {"numpy": _np_to, "array_api_strict": _strict_to, "torch": _torch_to}


@pytest.fixture(scope="module", params=list(NAMESPACES))
def to_xp(request):
    return NAMESPACES[request.param]


def back(x) -> np.ndarray:
    """A namespace array back to NumPy."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception:  # pragma: no cover - fallback for namespaces without __array__
        return np.from_dlpack(x)


def test_back_roundtrip_array_api_strict():
    """np.asarray works on array_api_strict arrays (the conversion every comparison relies on)."""
    src = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = back(array_api_strict.asarray(src))
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, src)


def test_namespace_is_preserved(to_xp):
    """The core returns arrays of the inputs' namespace."""
    rng = np.random.default_rng(1)
    a = to_xp(rng.normal(size=(2, 3, 4)))
    g = to_xp(rng.normal(size=(2, 3, 4)))
    for out in [W.gradcam(a, g), W.gradcam_pp(a, g), W.xgradcam(a, g), W.layercam(a, g),
                M.principal_component(a), M.upsample(M.channel_sum(a), (7,)), M.normalize(M.channel_sum(a))]:
        assert type(out) is type(a)


# ------------------------------------------------------------------------------------------- strategies
@st.composite
def spatial_shape(draw, ndim=None):
    nd = draw(st.sampled_from([1, 2, 3])) if ndim is None else ndim
    hi = {1: 7, 2: 5, 3: 4}[nd]
    return tuple(draw(st.integers(1, hi)) for _ in range(nd))


@st.composite
def act_grad(draw, kind=None):
    """``(A, G)`` float64 ``(B, C, *S)`` with B 1-3, C 1-6, 1/2/3 spatial dims.

    ``dyadic`` values (multiples of 1/4 in [-2, 2], many exact zeros) make sums and products exact and hit
    the exact-zero denominators of Grad-CAM++ / XGrad-CAM; ``normal`` values are continuous."""
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 6))
    s = draw(spatial_shape())
    shape = (b, c, *s)
    seed = draw(st.integers(0, 2**32 - 1))
    kind = kind or draw(st.sampled_from(["dyadic", "normal", "relu-normal"]))
    rng = np.random.default_rng(seed)
    if kind == "dyadic":
        a = rng.integers(-8, 9, size=shape) / 4.0
        g = rng.integers(-8, 9, size=shape) / 4.0
    else:
        a = rng.normal(size=shape)
        g = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 1)
        if kind == "relu-normal":  # post-ReLU activations, as in a CNN
            a = np.maximum(a, 0.0)
    return a.astype(np.float64), g.astype(np.float64)


# ------------------------------------------------------------------------------------------- oracles
def positions(s):
    return list(itertools.product(*[range(n) for n in s]))


def o_cam(class_weights, idx):
    return np.stack([np.asarray(class_weights, np.float64)[int(i)] for i in idx])


def o_gradcam(a, g):
    b, c, *s = g.shape
    pos = positions(s)
    w = np.zeros((b, c))
    for i in range(b):
        for k in range(c):
            w[i, k] = sum(g[(i, k, *p)] for p in pos) / len(pos)  # 1/Z sum_ij dy/dA_ij
    return w


def o_gradcam_pp(a, g):
    """Grad-CAM++ eq. (19) literally; alpha = 0 where G == 0 or the denominator is 0. Also returns the sum of
    |alpha * relu(G)| terms, the scale of the result (for a scale-aware tolerance)."""
    b, c, *s = g.shape
    pos = positions(s)
    w = np.zeros((b, c))
    scale = np.zeros((b, c))
    for i in range(b):
        for k in range(c):
            sum_a = sum(a[(i, k, *p)] for p in pos)
            for p in pos:
                gij = g[(i, k, *p)]
                den = 2 * gij**2 + sum_a * gij**3
                alpha = 0.0 if (gij == 0 or den == 0) else gij**2 / den
                w[i, k] += alpha * max(gij, 0.0)
                scale[i, k] += abs(alpha * max(gij, 0.0))
    return w, scale


def o_gradcam_pp_pytorch_grad_cam(a, g, eps):
    """pytorch-grad-cam's GradCAMPlusPlus.get_cam_weights formula (with its eps as a parameter)."""
    axes = tuple(range(2, a.ndim))
    g2 = g**2
    g3 = g2 * g
    sum_a = a.sum(axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        aij = g2 / (2 * g2 + sum_a * g3 + eps)
        aij = np.where(g != 0, aij, 0)
        return (np.maximum(g, 0) * aij).sum(axis=axes)


def o_xgradcam(a, g, eps=0.0):
    b, c, *s = g.shape
    pos = positions(s)
    w = np.zeros((b, c))
    for i in range(b):
        for k in range(c):
            den = sum(a[(i, k, *p)] for p in pos) + eps
            if den == 0:
                w[i, k] = 0.0  # a channel whose activations sum to 0 gets weight 0
            else:
                w[i, k] = sum(a[(i, k, *p)] / den * g[(i, k, *p)] for p in pos)
    return w


def o_hirescam(a, g):
    return g.copy()


def o_gradcam_elementwise(a, g):
    out = np.zeros_like(g)
    for idx in np.ndindex(*g.shape):
        out[idx] = g[idx] if g[idx] * a[idx] > 0 else 0.0
    return out


def o_layercam(a, g):
    out = np.zeros_like(g)
    for idx in np.ndindex(*g.shape):
        out[idx] = max(g[idx], 0.0)
    return out


def o_channel_sum(x):
    b, c, *s = x.shape
    out = np.zeros((b, *s))
    for i in range(b):
        for p in positions(s):
            out[(i, *p)] = sum(x[(i, k, *p)] for k in range(c))
    return out


def o_relu(x):
    return np.where(x > 0, x, 0.0)


def o_normalize(x):
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(x.shape[0]):
        lo, hi = float(np.min(x[i])), float(np.max(x[i]))
        if hi > lo:
            out[i] = (x[i] - lo) / (hi - lo)
    return out


def o_eigen(x):
    """Eigen-CAM eq. (4): per sample, the (N, C) matrix of positions, centred, projected on v_1 of its SVD.
    Returns the projections (sign as LAPACK gives it), the singular values and each position's energy
    ``sum_k x_k^2`` (of the uncentred points), the default orientation."""
    b, c, *s = x.shape
    projs, svals, energies = [], [], []
    for i in range(b):
        raw = x[i].reshape(c, -1).T.astype(np.float64)  # (N, C), row-major positions
        pts = raw - raw.mean(axis=0, keepdims=True)
        _, sv, vh = np.linalg.svd(pts, full_matrices=False)
        projs.append((pts @ vh[0]).reshape(s))
        svals.append(sv)
        energies.append((raw**2).sum(axis=1).reshape(s))
    return projs, svals, energies


def o_linear_1d(x, axis, n_out):
    """Linear resampling along ``axis`` with half-pixel centres (align_corners=False), clamped borders."""
    n_in = x.shape[axis]
    x = np.moveaxis(x, axis, -1)
    out = np.zeros(x.shape[:-1] + (n_out,))
    for j in range(n_out):
        src = (j + 0.5) * n_in / n_out - 0.5
        src = min(max(src, 0.0), n_in - 1.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        t = src - i0
        out[..., j] = (1 - t) * x[..., i0] + t * x[..., i1]
    return np.moveaxis(out, -1, axis)


def o_upsample(x, size):
    for axis, n in enumerate(size, start=1):
        x = o_linear_1d(x, axis, n)
    return x


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    actual = back(actual)
    assert actual.shape == np.shape(expected), (actual.shape, np.shape(expected))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------- weights
@SETTINGS
@given(data=st.data(), k=st.integers(1, 7))
def test_cam_oracle(to_xp, data, k):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    c = data.draw(st.integers(1, 6))
    b = data.draw(st.integers(1, 3))
    cw = rng.normal(size=(k, c))
    idx = rng.integers(0, k, size=b)
    assert_close(W.cam(to_xp(cw), to_xp(idx)), o_cam(cw, idx))


@SETTINGS
@given(ag=act_grad())
def test_gradcam_oracle(to_xp, ag):
    a, g = ag
    assert_close(W.gradcam(to_xp(a), to_xp(g)), o_gradcam(a, g))


@SETTINGS
@given(ag=act_grad())
def test_gradcam_pp_eps0_oracle(to_xp, ag):
    a, g = ag
    expected, scale = o_gradcam_pp(a, g)
    actual = back(W.gradcam_pp(to_xp(a), to_xp(g)))
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual))
    np.testing.assert_array_less(np.abs(actual - expected), 1e-9 * scale + 1e-12)


@SETTINGS
@given(ag=act_grad(kind="dyadic"))
def test_gradcam_pp_eps0_zero_denominators(to_xp, ag):
    """Force exact zero denominators 2 + sum_a * G == 0 (G = -2 / sum_a) and G == 0: alpha must be 0 there."""
    a, g = ag
    sum_a = a.sum(axis=tuple(range(2, a.ndim)), keepdims=True)
    # only where sum_a is +/- a power of two, so that G = -2 / sum_a and 2 + sum_a * G == 0 are exact
    pow2 = (sum_a != 0) & (np.abs(np.frexp(sum_a)[0]) == 0.5)
    singular = np.where(pow2, -2.0 / np.where(pow2, sum_a, 1.0), 0.0)
    assert np.all(2 + sum_a * singular == np.where(pow2, 0.0, 2.0))
    g = g.copy()
    first = (slice(None), slice(None)) + (0,) * (a.ndim - 2)
    g[first] = np.broadcast_to(singular, g.shape)[first]
    expected, scale = o_gradcam_pp(a, g)
    actual = back(W.gradcam_pp(to_xp(a), to_xp(g)))
    assert np.all(np.isfinite(actual))
    np.testing.assert_array_less(np.abs(actual - expected), 1e-9 * scale + 1e-12)


def test_gradcam_pp_eps0_hand_computed(to_xp):
    """A = [-1, 0, 0] (sum -1), G = [2, 1, 0]: position 0 has 2*G^2 + sumA*G^3 = 8 - 8 = 0 -> alpha 0 (not inf);
    position 1: alpha = 1 / (2 - 1) = 1, relu(G) = 1; position 2: G = 0 -> alpha 0. So w = 1."""
    a = np.array([[[-1.0, 0.0, 0.0]]])
    g = np.array([[[2.0, 1.0, 0.0]]])
    assert_close(W.gradcam_pp(to_xp(a), to_xp(g)), np.array([[1.0]]), rtol=0, atol=0)
    # 2-D, two channels: channel 0 as above laid out 1x3; channel 1 all-zero gradients -> weight 0
    a2 = np.stack([a[0, 0], np.ones(3)])[None, :, None, :]
    g2 = np.stack([g[0, 0], np.zeros(3)])[None, :, None, :]
    assert_close(W.gradcam_pp(to_xp(a2), to_xp(g2)), np.array([[1.0, 0.0]]), rtol=0, atol=0)


@SETTINGS
@given(ag=act_grad(), eps=st.sampled_from([1e-6, 1e-3, 0.5]))
def test_gradcam_pp_eps_matches_pytorch_grad_cam_formula(to_xp, ag, eps):
    a, g = ag
    expected = o_gradcam_pp_pytorch_grad_cam(a, g, eps)
    assume(np.all(np.isfinite(expected)))
    axes = tuple(range(2, a.ndim))
    g2 = g**2
    terms = np.abs(np.where(g != 0, g2 / (2 * g2 + a.sum(axis=axes, keepdims=True) * g2 * g + eps), 0)
                   * np.maximum(g, 0))
    actual = back(W.gradcam_pp(to_xp(a), to_xp(g), eps=eps))
    np.testing.assert_array_less(np.abs(actual - expected), 1e-9 * terms.sum(axis=axes) + 1e-12)


@SETTINGS
@given(ag=act_grad(kind="relu-normal"))
def test_gradcam_pp_eps_equals_pytorch_grad_cam_itself(ag):
    """The installed pytorch-grad-cam's own GradCAMPlusPlus weights (its eps is 1e-6)."""
    gc = pytest.importorskip("pytorch_grad_cam")
    a, g = ag
    expected = gc.GradCAMPlusPlus.get_cam_weights(None, None, None, None, a, g)
    assume(np.all(np.isfinite(expected)))
    actual = back(W.gradcam_pp(a, g, eps=1e-6))
    np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-12)


@SETTINGS
@given(ag=act_grad(), eps=st.sampled_from([0.0, 1e-7]))
def test_xgradcam_oracle(to_xp, ag, eps):
    a, g = ag
    expected = o_xgradcam(a, g, eps)
    sums = np.abs(a).sum(axis=tuple(range(2, a.ndim)))
    den = np.abs(a.sum(axis=tuple(range(2, a.ndim))) + eps)
    # scale of each weight: sum |A G| / |sum A|
    scale = np.where(den > 0, (np.abs(a * g)).sum(axis=tuple(range(2, a.ndim))) / np.where(den > 0, den, 1), 0)
    actual = back(W.xgradcam(to_xp(a), to_xp(g), eps=eps))
    assert np.all(np.isfinite(actual))
    np.testing.assert_array_less(np.abs(actual - expected), 1e-9 * (scale + sums) + 1e-12)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_xgradcam_zero_sum_channel(to_xp, ndim):
    """Channels whose activations sum to exactly 0 (all zero, or +/- cancelling) get weight 0, not NaN/inf."""
    rng = np.random.default_rng(ndim)
    s = (4,) * ndim
    a = rng.normal(size=(2, 3, *s))
    g = rng.normal(size=(2, 3, *s))
    a[0, 1] = 0.0  # dead channel
    flat = np.zeros(int(np.prod(s)))
    flat[0], flat[1] = 1.5, -1.5  # cancelling channel: sum exactly 0, but sum(A * G) != 0
    a[1, 2] = flat.reshape(s)
    expected = o_xgradcam(a, g)
    assert expected[0, 1] == 0 and expected[1, 2] == 0
    actual = back(W.xgradcam(to_xp(a), to_xp(g)))
    assert actual[0, 1] == 0 and actual[1, 2] == 0
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)
    # pytorch-grad-cam's eps=1e-7 variant: sum(A*G) / (0 + 1e-7) in the cancelling channel
    actual_eps = back(W.xgradcam(to_xp(a), to_xp(g), eps=1e-7))
    np.testing.assert_allclose(actual_eps, o_xgradcam(a, g, 1e-7), rtol=1e-9)


@SETTINGS
@given(ag=act_grad())
def test_hirescam_oracle(to_xp, ag):
    a, g = ag
    assert_close(W.hirescam(to_xp(a), to_xp(g)), o_hirescam(a, g), rtol=0, atol=0)
    # the HiResCAM map is sum_k G^k * A^k (paper eq. (4))
    mp = M.channel_sum(M.weigh(W.hirescam(to_xp(a), to_xp(g)), to_xp(a)))
    assert_close(mp, o_channel_sum(g * a))


@SETTINGS
@given(ag=act_grad())
def test_gradcam_elementwise_oracle(to_xp, ag):
    a, g = ag
    assert_close(W.gradcam_elementwise(to_xp(a), to_xp(g)), o_gradcam_elementwise(a, g), rtol=0, atol=0)
    # the map is sum_k relu(G^k * A^k)
    mp = M.channel_sum(M.weigh(W.gradcam_elementwise(to_xp(a), to_xp(g)), to_xp(a)))
    assert_close(mp, o_channel_sum(o_relu(g * a)))


@SETTINGS
@given(ag=act_grad())
def test_layercam_oracle(to_xp, ag):
    a, g = ag
    assert_close(W.layercam(to_xp(a), to_xp(g)), o_layercam(a, g), rtol=0, atol=0)


@SETTINGS
@given(ag=act_grad(kind="normal"))
def test_eigengradcam_oracle(to_xp, ag):
    """EigenGrad-CAM: the first principal component of G * A."""
    a, g = ag
    weighted = M.weigh(W.eigengradcam(to_xp(a), to_xp(g)), to_xp(a))
    assert_close(weighted, g * a)
    _check_eigen(back(M.principal_component(weighted)), g * a)


# ------------------------------------------------------------------------------------------- Eigen-CAM
def _check_eigen(actual, x):
    """``actual`` is the projection on v_1 (up to sign) with non-negative covariance with each position's
    energy."""
    projs, svals, energies = o_eigen(x)
    assert actual.shape == (x.shape[0], *x.shape[2:])
    for i, (p, sv, ref) in enumerate(zip(projs, svals, energies)):
        tol = 1e-8 * (1.0 + np.abs(x[i]).max())
        if sv[0] <= 1e-12:  # nothing varies: the projection is 0
            np.testing.assert_allclose(actual[i], 0.0, atol=tol)
            continue
        assume(len(sv) == 1 or sv[0] - sv[1] > 1e-3 * sv[0])  # v_1 unique up to sign
        err = min(np.abs(actual[i] - p).max(), np.abs(actual[i] + p).max())
        assert err <= tol, (actual[i], p)
        # the sign rule: never inverted, i.e. non-negative covariance with the reference
        centred = ref - ref.mean()
        cov = float(np.sum(actual[i] * centred))
        assume(abs(cov) > 1e-6 * np.linalg.norm(actual[i]) * np.linalg.norm(centred))  # the sign is determined
        assert cov > 0


@SETTINGS
@given(ag=act_grad(kind="normal"))
def test_principal_component_oracle(to_xp, ag):
    a, _ = ag
    _check_eigen(back(M.principal_component(to_xp(a))), a)


@SETTINGS
@given(ag=act_grad(kind="relu-normal"))
def test_principal_component_oracle_relu_acts(to_xp, ag):
    a, _ = ag
    _check_eigen(back(M.principal_component(to_xp(a))), a)


def test_principal_component_near_float32_max_is_finite_and_exact(to_xp):
    """Issue 13: finite activations near float32's maximum (2.25e38) once overflowed in the centring, and the SVD
    on inf never returned (Keras, Flax) or raised LinAlgError (torch). The component is scale-free: computed on
    unit-scaled points, it equals the float64 oracle's projection of the same points (scaled back)."""
    w = np.zeros((1, 3, 9), "float32")
    w[0, 0, 4] = w[0, 0, 8] = w[0, 1, 0] = 2.25e38
    w[0, 1, 4] = -1.68e38
    got = back(M.principal_component(to_xp(w)))
    assert np.isfinite(got).all()
    projs, _, _ = o_eigen(w.astype(np.float64) / 2.25e38)
    want = projs[0] * 2.25e38
    err = min(np.abs(got[0] - want).max(), np.abs(got[0] + want).max())
    assert err <= 1e-5 * np.abs(want).max()
    w[0, 2, 2] = np.inf
    with pytest.raises(ValueError, match=r"eigen: the weighted activations contain NaN or inf"):
        M.principal_component(to_xp(w))


def test_principal_component_sign_is_fixed_by_energy(to_xp):
    """A rank-1 map ``d * pattern``: the projection on the unit direction is ``|d| * (pattern - mean)``, up to
    sign; the sign is the one whose covariance with the energy ``|d|^2 pattern^2`` is positive. The energy is the
    same for the map and its negation, so both give the same Eigen-CAM (the SVD sign alone is arbitrary)."""
    rng = np.random.default_rng(3)
    pattern = rng.normal(size=(5, 6)) + 0.5
    direction = np.array([1.0, 2.0, 0.5])
    x = direction[None, :, None, None] * pattern[None, None]  # (1, 3, 5, 6)
    centred = (pattern - pattern.mean()) * np.linalg.norm(direction)
    expected = centred if np.sum(centred * pattern**2) > 0 else -centred
    for sgn in (1.0, -1.0):
        out = back(M.principal_component(to_xp(sgn * x)))[0]
        np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)


def test_principal_component_sign_follows_orient(to_xp):
    """With ``orient=`` the projection agrees with that map: the same component, oriented by the map or by its
    negation, comes out with opposite signs."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 4, 5, 6)) + 2.0 * rng.random(size=(2, 1, 5, 6))
    ref = x.sum(axis=1)
    projs, _, _ = o_eigen(x)
    for sgn in (1.0, -1.0):
        out = back(M.principal_component(to_xp(x), orient=to_xp(sgn * ref)))
        for i, p in enumerate(projs):
            expected = p if np.sum(p * sgn * ref[i]) > 0 else -p
            np.testing.assert_allclose(out[i], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(back(M.principal_component(to_xp(x), orient=to_xp(ref))),
                               -back(M.principal_component(to_xp(x), orient=to_xp(-ref))), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- maps
@SETTINGS
@given(ag=act_grad())
def test_channel_sum_and_relu_oracle(to_xp, ag):
    a, g = ag
    x = a * g
    assert_close(M.channel_sum(to_xp(x)), o_channel_sum(x))
    assert_close(M.relu(to_xp(x)), o_relu(x), rtol=0, atol=0)


@st.composite
def maps_batch(draw, ndim=None):
    b = draw(st.integers(1, 3))
    s = draw(spatial_shape(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(b, *s)) * 10.0 ** rng.uniform(-3, 3)
    const = draw(st.lists(st.booleans(), min_size=b, max_size=b))
    for i, flag in enumerate(const):
        if flag:
            x[i] = rng.normal()  # a constant map
    return x


@SETTINGS
@given(x=maps_batch())
def test_normalize_oracle(to_xp, x):
    out = back(M.normalize(to_xp(x)))
    assert not np.any(np.isnan(out))
    np.testing.assert_allclose(out, o_normalize(x), rtol=1e-12, atol=1e-12)
    for i in range(x.shape[0]):
        if np.ptp(x[i]) == 0:
            assert np.all(out[i] == 0)
        else:
            assert out[i].min() == 0 and abs(out[i].max() - 1) < 1e-12


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normalize_constant_map_is_zero(to_xp, dtype):
    x = np.full((2, 3, 4), 7.25, dtype=dtype)
    x[1] = -1e-30
    out = back(M.normalize(to_xp(x)))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, np.zeros_like(x))


@SETTINGS
@given(data=st.data())
def test_fuse_oracle(to_xp, data):
    x = data.draw(maps_batch())
    n = data.draw(st.integers(2, 4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    cams = [x] + [rng.normal(size=x.shape) * rng.uniform(0.1, 10) for _ in range(n - 1)]
    expected = np.mean([o_normalize(c) for c in cams], axis=0)
    out = M.fuse([to_xp(c) for c in cams])
    assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_fuse_single_map_is_returned_unchanged(to_xp):
    """One layer: nothing to fuse, the map is returned as it is (explain normalises afterwards when asked;
    with normalize=False a single layer keeps its raw scale)."""
    x = np.array([[[3.0, 5.0, 9.0]]])
    assert_close(M.fuse([to_xp(x)]), x)


# ------------------------------------------------------------------------------------------- upsample
@st.composite
def resize_case(draw, ndim=None):
    x = draw(maps_batch(ndim))
    nd = x.ndim - 1
    size = tuple(draw(st.integers(1, 9)) for _ in range(nd))
    return x.astype(np.float32), size


_TORCH_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


@SETTINGS
@given(case=resize_case())
def test_upsample_matches_numpy_oracle(to_xp, case):
    x, size = case
    x = x.astype(np.float64)
    expected = o_upsample(x, size)
    scale = 1.0 + np.abs(x).max()
    assert_close(M.upsample(to_xp(x), size), expected, rtol=0, atol=1e-6 * scale)


@SETTINGS
@given(case=resize_case())
def test_upsample_matches_torch_interpolate(to_xp, case):
    x, size = case
    nd = x.ndim - 1
    expected = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=size, mode=_TORCH_MODE[nd],
                                               align_corners=False)[:, 0].numpy()
    scale = 1.0 + np.abs(x).max()
    out = back(M.upsample(to_xp(x), size))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6 * scale)


@SETTINGS
@given(case=resize_case(ndim=2))
def test_upsample_matches_cv2_inter_linear(to_xp, case):
    cv2 = pytest.importorskip("cv2")
    x, size = case
    expected = np.stack([cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR).reshape(size)
                         for m in x])
    scale = 1.0 + np.abs(x).max()
    np.testing.assert_allclose(back(M.upsample(to_xp(x), size)), expected, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("factor", [0.5, 1 / 3, 2, 3, 1.5])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_upsample_fixed_factors_vs_torch(to_xp, factor, nd):
    rng = np.random.default_rng(nd)
    s = (6,) * nd
    x = rng.normal(size=(2, *s)).astype(np.float32)
    size = tuple(max(1, round(n * factor)) for n in s)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=size, mode=_TORCH_MODE[nd],
                                               align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(back(M.upsample(to_xp(x), size)), expected, rtol=0, atol=1e-5)


def test_upsample_identity_and_size_error(to_xp):
    x = np.random.default_rng(0).normal(size=(2, 3, 4))
    np.testing.assert_array_equal(back(M.upsample(to_xp(x), (3, 4))), x)
    with pytest.raises(ValueError, match="size"):
        M.upsample(to_xp(x), (3, 4, 5))


# ------------------------------------------------------------------------------------------- identities
@SETTINGS
@given(data=st.data())
def test_gap_linear_identity_numpy(to_xp, data):
    """On a GAP + linear head y = W mean(A) + b, dy/dA^k_ij = W_ck / N, so Grad-CAM's weights are CAM's / N
    and the normalised maps agree."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    b = data.draw(st.integers(1, 3))
    c = data.draw(st.integers(1, 6))
    s = data.draw(spatial_shape())
    k = data.draw(st.integers(1, 5))
    n = int(np.prod(s))
    a = np.maximum(rng.normal(size=(b, c, *s)), 0)
    wm = rng.normal(size=(k, c))
    idx = rng.integers(0, k, size=b)
    g = np.broadcast_to((wm[idx] / n).reshape(b, c, *([1] * len(s))), a.shape).copy()
    w_grad = back(W.gradcam(to_xp(a), to_xp(g)))
    w_cam = back(W.cam(to_xp(wm), to_xp(idx)))
    np.testing.assert_allclose(w_grad, wm[idx] / n, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(w_grad, w_cam / n, rtol=1e-12, atol=1e-15)

    def full(w):
        return back(M.normalize(M.relu(M.channel_sum(M.weigh(w, to_xp(a))))))

    expected = o_normalize(o_relu(o_channel_sum(wm[idx].reshape(b, c, *([1] * len(s))) * a)))
    np.testing.assert_allclose(full(W.gradcam(to_xp(a), to_xp(g))), expected, atol=1e-9)
    np.testing.assert_allclose(full(W.cam(to_xp(wm), to_xp(idx))), expected, atol=1e-9)


_CONV = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}
_POOL = {1: torch.nn.AdaptiveAvgPool1d, 2: torch.nn.AdaptiveAvgPool2d, 3: torch.nn.AdaptiveAvgPool3d}


def _gap_model(nd, c_in=2, c_mid=4, k=5, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(OrderedDict([
        ("conv", _CONV[nd](c_in, c_mid, 3, padding=1)),
        ("relu", torch.nn.ReLU()),
        ("pool", _POOL[nd](1)),
        ("flat", torch.nn.Flatten()),
        ("fc", torch.nn.Linear(c_mid, k)),
    ])).eval()


@pytest.mark.parametrize("nd,spatial", [(1, (9,)), (2, (6, 7)), (3, (4, 5, 3))])
def test_gap_linear_identity_torch_explain(nd, spatial):
    model = _gap_model(nd)
    torch.manual_seed(1)
    x = torch.randn(3, 2, *spatial)
    targets = [0, 3, 4]
    g = camcore.explain(model, x, method="gradcam", layer="relu", targets=targets)
    c = camcore.explain(model, x, method="cam", layer="relu", targets=targets)
    assert tuple(g.shape) == (3, *spatial)
    np.testing.assert_allclose(back(g), back(c), atol=1e-5)
    # raw maps (no normalise/upsample): Grad-CAM = CAM / N, and CAM = relu(sum_k W_ck A_k) computed here
    g_raw = back(camcore.explain(model, x, method="gradcam", layer="relu", targets=targets, normalize=False,
                                 upsample=False))
    c_raw = back(camcore.explain(model, x, method="cam", layer="relu", targets=targets, normalize=False,
                                 upsample=False))
    with torch.no_grad():
        acts = model.relu(model.conv(x)).numpy().astype(np.float64)
    wm = model.fc.weight.detach().numpy().astype(np.float64)
    n = int(np.prod(spatial))
    expected_cam = o_relu(o_channel_sum(wm[targets].reshape(3, -1, *([1] * nd)) * acts))
    scale = np.abs(expected_cam).max()
    np.testing.assert_allclose(c_raw, expected_cam, atol=1e-5 * scale)
    np.testing.assert_allclose(g_raw, expected_cam / n, atol=1e-5 * scale / n)
    # and with top-class targets
    g2 = camcore.explain(model, x, method="gradcam", layer="relu")
    c2 = camcore.explain(model, x, method="cam", layer="relu")
    np.testing.assert_allclose(back(g2), back(c2), atol=1e-5)
