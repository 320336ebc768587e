"""Counting: exact totals against an independent count from the architecture table, the paper's 1/N + 1/D_K^2
identity, counted mult-adds against the multiply-accumulates a naive loop performs, and the convention's flags."""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

import models
from bench.paper import model_counts
from kernels.geometry import conv_geometry
from tinyconv import (BatchNorm, Conv2D, DepthwiseConv2D, Linear, PointwiseConv2D, ReLU, Sequential)
from tinyconv.counting import Convention, count, separable_blocks
from tinyconv.summary import summary

# The paper's Table 1 re-typed here, so the expected counts do not come from the code under test.
BLOCKS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)] + [(1, 512)] * 5 + [(2, 1024), (1, 1024)]
VGG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def mobilenet_expected(alpha=1.0, res=224, classes=1000, shallow=False, full_conv=False):
    """(mult-adds, paper params) by hand: D_F^2 D_K^2 M N per conv, D_F^2 D_K^2 M + D_F^2 M N per block."""
    c, size = int(32 * alpha), math.ceil(res / 2)
    macs, params = size * size * 27 * c, 27 * c
    for i, (s, n) in enumerate(BLOCKS, start=1):
        if shallow and 7 <= i <= 11:
            continue
        n, size = int(n * alpha), math.ceil(size / s)
        if full_conv:
            macs, params = macs + size * size * 9 * c * n, params + 9 * c * n
        else:
            macs, params = macs + size * size * (9 * c + c * n), params + 9 * c + c * n
        c = n
    return macs + c * classes, params + c * classes


def vgg_expected(res=224, classes=1000):
    c, size, macs, params = 3, res, 0, 0
    for v in VGG:
        if v == "M":
            size //= 2
        else:
            macs, params, c = macs + size * size * 9 * c * v, params + 9 * c * v + v, v
    for n_in, n_out in ((size * size * c, 4096), (4096, 4096), (4096, classes)):
        macs, params = macs + n_in * n_out, params + n_in * n_out + n_out
    return macs, params


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.5, 0.25])
@pytest.mark.parametrize("res", [224, 192, 160, 128])
def test_exact_totals_for_every_alpha_and_resolution(alpha, res):
    mc = count(models.mobilenet_v1(alpha=alpha, resolution=res))
    assert (mc.macs, mc.params_paper) == mobilenet_expected(alpha, res)


def test_published_anchor_values():
    """The integers themselves, for a reader: 1.0-224 and the two variants."""
    assert mobilenet_expected() == (568_740_352, 4_209_088)
    assert mobilenet_expected(shallow=True) == (307_323_392, 2_875_328)
    assert mobilenet_expected(full_conv=True) == (4_867_293_184, 29_281_120)
    assert vgg_expected() == (15_470_264_320, 138_357_544)


@pytest.mark.parametrize("kwargs", [dict(shallow=True), dict(full_conv=True), dict(alpha=0.5, shallow=True,
                                                                                     resolution=160)])
def test_exact_totals_of_variants(kwargs):
    mc = count(models.mobilenet_v1(**kwargs))
    expected = mobilenet_expected(kwargs.get("alpha", 1.0), kwargs.get("resolution", 224),
                                  shallow=kwargs.get("shallow", False), full_conv=kwargs.get("full_conv", False))
    assert (mc.macs, mc.params_paper) == expected


def test_vgg16_exact_totals():
    mc = model_counts("vgg16")[0]  # count(models.vgg16()), cached: --paper's test reuses the 138M-parameter build
    assert (mc.macs, mc.params_trainable) == vgg_expected()
    assert mc.params_total == mc.params_trainable  # no batch norm


def test_params_three_ways():
    mc = count(models.mobilenet_v1())
    bn_channels = sum(layer.channels for layer in models.mobilenet_v1(alpha=1.0).layers if layer.kind == "batchnorm")
    assert mc.params_trainable == mc.params_paper + 1000 + 2 * bn_channels  # + classifier bias, gamma, beta
    assert mc.params_total == mc.params_trainable + 2 * bn_channels  # + moving mean, moving variance


def test_by_type_is_the_papers_table_2():
    rows = {t["type"]: t for t in count(models.mobilenet_v1()).by_type}
    assert [round(rows[t]["macs_pct"], 2) for t in ("Conv 1x1", "Conv DW 3x3", "Conv 3x3", "FC")] == [
        94.86, 3.06, 1.91, 0.18]  # the paper prints 1.19 for Conv 3x3: see bench/paper.py
    assert [round(rows[t]["params_pct"], 2) for t in ("Conv 1x1", "Conv DW 3x3", "Conv 3x3", "FC")] == [
        74.59, 1.06, 0.02, 24.33]


@given(m=st.integers(1, 48), n=st.integers(1, 48), k=st.sampled_from([1, 3, 5, 7]), d_f=st.integers(1, 20),
       stride=st.integers(1, 3), padding=st.sampled_from(["same", "valid"]))
def test_separable_over_standard_is_one_over_n_plus_one_over_dk_squared(m, n, k, d_f, stride, padding):
    size = d_f * stride + k  # large enough for 'valid'
    model = Sequential([DepthwiseConv2D(m, k, stride=stride, padding=padding, name="dw"),
                        BatchNorm(m, name="bn"), ReLU(name="relu"), PointwiseConv2D(m, n, name="pw")],
                       input_shape=(size, size, m))
    (block,) = separable_blocks(model)
    assert block.ratio == block.identity == Fraction(1, n) + Fraction(1, k * k)
    standard = Conv2D(m, n, k, stride=stride, padding=padding)  # the conv the block replaces, counted by itself
    assert block.standard_macs == standard.macs((size, size, m))


def test_depth_multiplier_scales_the_identity():
    model = models.mobilenet_v1(depth_multiplier=2, alpha=0.25, resolution=64)
    for b in separable_blocks(model):
        assert b.ratio == 2 * (Fraction(1, b.n) + Fraction(1, 9)) and b.note.startswith("depth multiplier")


# --- counted mult-adds against the multiply-accumulates a naive loop performs ---------------------------------

def naive_conv_counting(x, w, stride, padding, depthwise=False):
    """Direct convolution over every output element and kernel tap; returns (y, multiply-accumulates done).

    Taps that fall in the zero padding are multiplied too, as an im2col GEMM does and as the convention counts.
    """
    n_batch, h, wd, c = x.shape
    kh, kw = w.shape[:2]
    g = conv_geometry(h, wd, (kh, kw), stride, padding)
    xp = np.zeros((n_batch, h + g.pt + g.pb, wd + g.pl + g.pr, c), x.dtype)
    xp[:, g.pt:g.pt + h, g.pl:g.pl + wd] = x
    k_out = c * w.shape[3] if depthwise else w.shape[3]
    y = np.zeros((n_batch, g.oh, g.ow, k_out))
    done = 0
    for i in range(g.oh):
        for j in range(g.ow):
            for k in range(k_out):
                for a in range(kh):
                    for b in range(kw):
                        px = xp[0, i * stride + a, j * stride + b]
                        if depthwise:
                            ch, mult = divmod(k, w.shape[3])
                            y[0, i, j, k] += w[a, b, ch, mult] * px[ch]
                            done += 1
                        else:
                            y[0, i, j, k] += w[a, b, :, k] @ px
                            done += c
    return y, done


@pytest.mark.parametrize("h,c,k,ksize,stride,padding", [
    (5, 2, 3, 3, 1, "same"), (6, 3, 2, 3, 2, "same"), (7, 2, 4, 3, 2, "valid"), (5, 1, 2, 5, 1, "same"),
])
def test_conv_macs_equal_the_naive_loops_work(h, c, k, ksize, stride, padding):
    rng = np.random.default_rng(0)
    layer = Conv2D(c, k, ksize, stride=stride, padding=padding, rng=rng, dtype=np.float64)
    x = rng.standard_normal((1, h, h + 1, c))
    y, done = naive_conv_counting(x, layer.params["kernel"], stride, padding)
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-12, atol=1e-12)
    assert layer.macs(x.shape[1:]) == done


@pytest.mark.parametrize("h,c,mult,stride", [(5, 3, 1, 1), (6, 2, 2, 2), (7, 4, 1, 2)])
def test_depthwise_macs_equal_the_naive_loops_work(h, c, mult, stride):
    rng = np.random.default_rng(1)
    layer = DepthwiseConv2D(c, 3, stride=stride, padding="same", depth_multiplier=mult, rng=rng, dtype=np.float64)
    x = rng.standard_normal((1, h, h, c))
    y, done = naive_conv_counting(x, layer.params["depthwise_kernel"], stride, "same", depthwise=True)
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-12, atol=1e-12)
    assert layer.macs(x.shape[1:]) == done


def test_pointwise_and_linear_macs_equal_the_naive_loops_work():
    rng = np.random.default_rng(2)
    pw = PointwiseConv2D(3, 5, rng=rng, dtype=np.float64)
    x = rng.standard_normal((1, 4, 3, 3))
    y, done = naive_conv_counting(x, pw.params["kernel"].reshape(1, 1, 3, 5), 1, "valid")
    np.testing.assert_allclose(pw.forward(x), y, rtol=1e-12, atol=1e-12)
    assert pw.macs(x.shape[1:]) == done
    fc = Linear(6, 4, rng=rng, dtype=np.float64)
    v = rng.standard_normal((1, 6))
    done = sum(1 for _ in range(4) for _ in range(6))  # one multiply-accumulate per (output, input) pair
    np.testing.assert_allclose(fc.forward(v), v @ fc.params["kernel"] + fc.params["bias"], rtol=1e-12)
    assert fc.macs((6,)) == done


# --- the convention's flags -----------------------------------------------------------------------------------

def test_flags_add_exactly_the_free_ops():
    model = models.small_cnn()
    base = count(model)
    shapes = model.layer_shapes()
    bn = sum(math.prod(s) for layer, s, _ in shapes if layer.kind == "batchnorm")
    act = sum(math.prod(s) for layer, s, _ in shapes if layer.kind == "activation")
    assert count(model, convention=Convention(bn=True)).macs == base.macs + bn
    assert count(model, convention=Convention(activation=True)).macs == base.macs + act
    assert count(model, convention=Convention(bias=True)).macs == base.macs + 10  # the FC's 10 bias adds
    pool = 28 * 28 * 8 + 7 * 7 * 16  # 2x2 max pool windows (14x14x8 outputs x 4) + global average pool
    assert count(model, convention=Convention(pool=True)).macs == base.macs + pool
    assert base.flops == 2 * base.macs


def test_summary_labels_its_unit_and_lists_every_layer():
    model = models.mobilenet_v1(alpha=0.25, resolution=128)
    text = summary(model)
    assert "mult-adds (MACs)" in text and "FLOPs (2 x mult-adds)" in text
    assert all(layer.name in text for layer in model.layers)
    assert f"{count(model).macs:,}" in text
    assert "FLOPs (2 x mult-adds)" in summary(model, flops=True).splitlines()[0]
