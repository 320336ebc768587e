"""tinyconv: the layer graph, optimizers, data, checkpoints and training on top of the kernels."""
