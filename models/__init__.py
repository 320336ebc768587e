"""Architectures as data: MobileNet v1, VGG16 and a small CNN assembled from tinyconv layers."""
import kernels  # noqa: F401  (first: it sets a BLAS thread default that only applies before NumPy loads)
from models.mobilenet import MOBILENET_V1, SHALLOW_BLOCKS, Row, mobilenet_v1
from models.small import small_cnn
from models.vgg import VGG16, vgg16

BUILDERS = {"mobilenet": mobilenet_v1, "vgg16": vgg16, "small": small_cnn}
"""Model builders by the name ``build`` and ``python -m bench.flops --model`` accept."""


def build(name, **kwargs):
    """Build the model called ``name`` ('mobilenet', 'vgg16' or 'small') with the builder's keyword arguments."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(map(repr, BUILDERS))}")
    return BUILDERS[name](**kwargs)


__all__ = ["MOBILENET_V1", "SHALLOW_BLOCKS", "Row", "VGG16", "BUILDERS", "build", "mobilenet_v1", "small_cnn",
           "vgg16"]
