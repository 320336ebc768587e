"""Convolution and pooling geometry: the one source of truth for output sizes and padding.

Every kernel wrapper, layer and counter calls :func:`conv_geometry`; nothing else computes an output size.

Padding modes (per spatial axis):
    'valid'  no padding: OH = floor((H - KH) / sh) + 1, needs H >= KH.
    'same'   TensorFlow's rule: OH = ceil(H / sh); total pad = max((OH - 1) * sh + KH - H, 0), of which
             floor(total / 2) goes on top and the rest (the odd one) on the bottom, so with stride 2 on an even
             size the extra row and column are padded bottom/right.
    int p or (ph, pw)
             explicit symmetric zero padding: OH = floor((H + 2 ph - KH) / sh) + 1, needs H + 2 ph >= KH.
"""
from typing import NamedTuple


class ConvGeometry(NamedTuple):
    """Resolved geometry of a 2-D window op on an NHWC input.

    Attributes:
        oh, ow: output height and width.
        pt, pb, pl, pr: zero padding on top, bottom, left and right.
    """
    oh: int
    ow: int
    pt: int
    pb: int
    pl: int
    pr: int


def _pair(name, value):
    """Turn an int or a pair into a pair of ints, rejecting anything else."""
    # the usual cases first, by exact type (bool, a subclass of int, fails these and is rejected below)
    if type(value) is int:
        return value, value
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if isinstance(a, bool) or isinstance(b, bool) or not (isinstance(a, int) and isinstance(b, int)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(a), int(b)


def normalize_window(kernel_size, stride, padding):
    """Validate and normalize window hyperparameters.

    Args:
        kernel_size: int or (KH, KW), each >= 1.
        stride: int or (sh, sw), each >= 1.
        padding: 'same', 'valid', an int >= 0 or a pair (ph, pw) of ints >= 0.

    Returns:
        ((KH, KW), (sh, sw), padding) with padding either a lowercase mode string or a pair of ints.

    Raises:
        TypeError, ValueError: naming the argument, what was expected and what was given.
    """
    kh, kw = _pair("kernel_size", kernel_size)
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel_size must be >= 1, got {(kh, kw)}")
    sh, sw = _pair("stride", stride)
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    if isinstance(padding, str):
        mode = padding.lower()
        if mode not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        return (kh, kw), (sh, sw), mode
    ph, pw = _pair("padding", padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {(ph, pw)}")
    return (kh, kw), (sh, sw), (ph, pw)


def _axis(size, k, s, mode, p, axis):
    if mode == "same":
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        return out, total // 2, total - total // 2
    if mode == "valid":
        p = 0
    if size + 2 * p < k:
        raise ValueError(
            f"kernel {axis} {k} is larger than the padded input {axis} {size + 2 * p} "
            f"(input {size}, padding {p}); use a smaller kernel, more padding or padding='same'")
    return (size + 2 * p - k) // s + 1, p, p


def conv_geometry(h, w, kernel_size, stride=1, padding="valid"):
    """Output size and padding of a 2-D window op (conv, depthwise, pooling) on an h x w input.

    Args:
        h, w: input height and width, each >= 1.
        kernel_size, stride, padding: as in :func:`normalize_window`.

    Returns:
        ConvGeometry(oh, ow, pt, pb, pl, pr).

    Raises:
        ValueError: a size is < 1, or the kernel does not fit in the padded input.
    """
    (kh, kw), (sh, sw), pad = normalize_window(kernel_size, stride, padding)
    if h < 1 or w < 1:
        raise ValueError(f"input height and width must be >= 1, got {(h, w)}")
    if isinstance(pad, str):
        oh, pt, pb = _axis(h, kh, sh, pad, 0, "height")
        ow, pl, pr = _axis(w, kw, sw, pad, 0, "width")
    else:
        oh, pt, pb = _axis(h, kh, sh, "explicit", pad[0], "height")
        ow, pl, pr = _axis(w, kw, sw, "explicit", pad[1], "width")
    return ConvGeometry(oh, ow, pt, pb, pl, pr)
