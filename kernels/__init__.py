"""tinyconv kernels: Numba loops with hand-written backward passes, NHWC layout.

Each module holds one op family with its forward and backward side by side. Importing compiles nothing; each
kernel compiles on its first call and is cached on disk.
"""
