"""Softmax cross-entropy against the loop oracle, -log softmax, finite differences and PyTorch; bad input raises."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck import assert_close, check_directional, check_grad
from kernels.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from oracles_misc import (import_torch, one_numba_thread, softmax_cross_entropy_backward_oracle,  # noqa: F401
                          softmax_cross_entropy_oracle)

SMOOTHING = st.sampled_from([0.0, 0.1, 0.5, 1.0])


@st.composite
def loss_cases(draw, max_n=8, max_k=12):
    """(N, K, seed, logit scale, label dtype, non-contiguous?): scale up to 1e3 tests the log-sum-exp."""
    return (draw(st.integers(1, max_n)), draw(st.integers(1, max_k)), draw(st.integers(0, 2 ** 32 - 1)),
            draw(st.sampled_from([0.1, 1.0, 10.0, 1000.0])),
            draw(st.sampled_from([np.int64, np.int32, np.uint8])), draw(st.booleans()))


def make_case(n, k, seed, scale, label_dtype, strided, dtype=np.float64):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, k)) * scale).astype(dtype)
    labels = rng.integers(0, k, n).astype(label_dtype)
    view = np.repeat(logits, 2, axis=1)[:, ::2] if strided else logits
    return logits, labels, view, float(rng.uniform(0.5, 2.0))


@given(case=loss_cases(), smoothing=SMOOTHING)
def test_float64_matches_oracle_and_finite_differences(case, smoothing):
    logits, labels, view, dloss = make_case(*case)
    loss, probs = softmax_cross_entropy_forward(view, labels, label_smoothing=smoothing)
    loss_o, probs_o = softmax_cross_entropy_oracle(logits, labels, smoothing)
    assert isinstance(loss, float) and probs.dtype == np.float64
    assert abs(loss - loss_o) <= 1e-12 * max(abs(loss_o), 1.0)
    assert_close(probs, probs_o, rtol=1e-12, atol_floor=1e-300, name="probs")
    # the scalar loss contracted with a random upstream gradient dloss: the backward's scale argument
    dlogits = softmax_cross_entropy_backward(probs, labels, label_smoothing=smoothing, scale=dloss)
    assert_close(dlogits, softmax_cross_entropy_backward_oracle(probs_o, labels, smoothing, dloss), rtol=1e-12,
                 name="dlogits")
    if case[3] <= 10.0:  # finite differences need a smooth neighbourhood; 1e3-scale logits saturate the softmax

        def f():
            return np.array(softmax_cross_entropy_forward(view, labels, label_smoothing=smoothing)[0])

        check_directional(f, view, np.array(dloss), dlogits, np.random.default_rng(case[2]), name="dlogits")


@settings(max_examples=40)
@given(case=loss_cases(max_n=3, max_k=4), smoothing=SMOOTHING)
def test_oracle_backward_matches_finite_differences(case, smoothing):
    n, k, seed, _, label_dtype, _ = case
    logits, labels, _, dloss = make_case(n, k, seed, 1.0, label_dtype, False)
    _, probs = softmax_cross_entropy_oracle(logits, labels, smoothing)
    check_grad(lambda: np.array(softmax_cross_entropy_oracle(logits, labels, smoothing)[0]), logits,
               np.array(dloss), softmax_cross_entropy_backward_oracle(probs, labels, smoothing, dloss),
               name="oracle dlogits")


@given(case=loss_cases(), smoothing=SMOOTHING)
def test_float32_matches_float64_oracle(case, smoothing):
    logits, labels, view, _ = make_case(*case, dtype=np.float32)
    loss, probs = softmax_cross_entropy_forward(view, labels, label_smoothing=smoothing)
    loss_o, probs_o = softmax_cross_entropy_oracle(logits, labels, smoothing)
    assert probs.dtype == np.float32
    assert abs(loss - loss_o) <= 1e-5 * max(abs(loss_o), 1.0)
    assert_close(probs, probs_o, rtol=1e-5, atol_floor=1e-7, name="probs")
    dlogits = softmax_cross_entropy_backward(probs, labels, label_smoothing=smoothing)
    assert dlogits.dtype == np.float32
    assert_close(dlogits, softmax_cross_entropy_backward_oracle(probs_o, labels, smoothing, 1.0), rtol=1e-5,
                 atol_floor=1e-7, name="dlogits")


@given(case=loss_cases())
def test_without_smoothing_is_minus_log_softmax_at_the_label(case):
    logits, labels, view, _ = make_case(*case)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss, probs = softmax_cross_entropy_forward(view, labels)
    assert abs(loss + log_softmax[np.arange(len(labels)), labels].mean()) <= 1e-12 * max(abs(loss), 1.0)
    assert_close(probs.sum(axis=1), np.ones(len(labels)), rtol=1e-14, name="rows sum to 1")


@given(case=loss_cases(), smoothing=SMOOTHING)
def test_matches_torch(case, smoothing):
    torch = import_torch()
    logits, labels, view, dloss = make_case(*case)
    loss, probs = softmax_cross_entropy_forward(view, labels, label_smoothing=smoothing)
    zt = torch.tensor(logits, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(labels.astype(np.int64)), label_smoothing=smoothing)
    (gt,) = torch.autograd.grad(lt, zt, torch.tensor(dloss, dtype=torch.float64))
    assert abs(loss - lt.item()) <= 1e-12 * max(abs(loss), 1.0)
    assert_close(softmax_cross_entropy_backward(probs, labels, label_smoothing=smoothing, scale=dloss), gt.numpy(),
                 rtol=1e-12, name="dlogits")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_stay_finite(dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-5e3, 5e3, 5e3]], dtype)
    labels = np.array([1, 2])
    loss, probs = softmax_cross_entropy_forward(logits, labels, label_smoothing=0.1)
    loss_o, _ = softmax_cross_entropy_oracle(logits.astype(np.float64), labels, 0.1)
    assert np.isfinite(loss) and np.isfinite(probs).all()
    assert abs(loss - loss_o) <= 1e-6 * loss_o


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_say_so(bad):
    logits = np.zeros((2, 3))
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*learning rate"):
        softmax_cross_entropy_forward(logits, np.array([0, 1]))


Z = np.zeros((3, 4))


@pytest.mark.parametrize("labels, error, match", [
    (np.array([0, 4, 1]), ValueError, r"labels\[1\] = 4"), (np.array([0, 1, -1]), ValueError, r"labels\[2\] = -1"),
    (np.array([0.0, 1.0, 2.0]), TypeError, "labels"), (np.array([0, 1]), ValueError, "labels"),
    ([0, 1, 2], TypeError, "labels"), (np.array([True, False, True]), TypeError, "labels")])
def test_rejects_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        softmax_cross_entropy_forward(Z, labels)
    with pytest.raises(error, match=match):
        softmax_cross_entropy_backward(Z + 0.25, labels)


@pytest.mark.parametrize("call, error, name", [
    (lambda: softmax_cross_entropy_forward(Z[0], np.array([0])), ValueError, "logits"),
    (lambda: softmax_cross_entropy_forward(Z.astype(np.int32), np.array([0, 1, 2])), TypeError, "logits"),
    (lambda: softmax_cross_entropy_forward(Z, np.array([0, 1, 2]), label_smoothing=1.5), ValueError,
     "label_smoothing"),
    (lambda: softmax_cross_entropy_backward(Z, np.array([0, 1, 2]), label_smoothing=-0.1), ValueError,
     "label_smoothing"),
    (lambda: softmax_cross_entropy_backward(Z, np.array([0, 1, 2]), scale=np.nan), ValueError, "scale"),
    (lambda: softmax_cross_entropy_backward(Z, np.array([0, 1, 2]), scale="1"), TypeError, "scale"),
    (lambda: softmax_cross_entropy_backward(Z[0], np.array([0])), ValueError, "probs")])
def test_rejects_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()
