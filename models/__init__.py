"""Architectures as data: MobileNet v1, VGG16 and small nets assembled from tinyconv layers."""
