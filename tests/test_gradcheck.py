"""Meta-tests: the gradient checkers must fail on a deliberately wrong backward, or they prove nothing."""
import numpy as np
import pytest

from gradcheck import assert_close, check_directional, check_grad


def _matmul_case(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 3))
    w = rng.standard_normal((3, 5))
    dy = rng.standard_normal((4, 5))
    return rng, x, w, dy


def test_checkers_accept_the_right_gradient():
    rng, x, w, dy = _matmul_case()
    check_grad(lambda: x @ w, x, dy, dy @ w.T)
    check_directional(lambda: x @ w, x, dy, dy @ w.T, rng)


@pytest.mark.parametrize("wrong", [
    lambda g: g * 1.001,                       # off by 0.1%
    lambda g: g + 1e-3 * (np.arange(g.size).reshape(g.shape) == 5),  # one entry wrong
    lambda g: g[::-1].copy(),                  # rows swapped (a transposition-type bug)
])
def test_checkers_reject_a_wrong_gradient(wrong):
    rng, x, w, dy = _matmul_case()
    bad = wrong(dy @ w.T)
    with pytest.raises(AssertionError):
        check_grad(lambda: x @ w, x, dy, bad)
    with pytest.raises(AssertionError):
        check_directional(lambda: x @ w, x, dy, bad, rng, n_dirs=3)


def test_whole_network_check_catches_one_wrong_layer(monkeypatch):
    """Scale one depthwise backward by 1.0001: the end-to-end check must notice."""
    from test_network import small_net
    from tinyconv import DepthwiseConv2D, SoftmaxCrossEntropy

    true_backward = DepthwiseConv2D.backward

    def wrong_backward(self, dy, need_dx=True):
        dx = true_backward(self, dy, need_dx)
        return None if dx is None else dx * 1.0001

    monkeypatch.setattr(DepthwiseConv2D, "backward", wrong_backward)
    rng = np.random.default_rng(0)
    model = small_net()
    model.split_backward = False  # the whole backward, the method patched here, on every machine
    x = rng.standard_normal((2, 8, 8, 3))
    labels = np.array([1, 4])
    loss = SoftmaxCrossEntropy()
    model.zero_grad()
    loss.forward(model.forward(x, training=True), labels)
    model.backward(loss.backward())
    name, p, g = model.named_parameters()[0]  # conv1/kernel sits below the wrong layer
    assert name == "conv1/kernel"

    def f():
        return np.array(SoftmaxCrossEntropy().forward(model.forward(x, training=True), labels))

    with pytest.raises(AssertionError):
        check_grad(f, p, np.array(1.0), g.copy(), rtol=1e-5, atol_floor=1e-9)


def test_assert_close_floor_is_relative_to_the_largest_entry():
    assert_close([1.0, 1e-12], [1.0, 0.0], rtol=1e-6)
    with pytest.raises(AssertionError, match="1 of 2 entries differ"):
        assert_close([1.0, 1e-3], [1.0, 0.0], rtol=1e-6)
