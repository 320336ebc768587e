"""Datasets, transforms and the batch iterator: everything between files on disk and a float32 NHWC batch.

Shape legend: ``N`` examples, ``B`` batch, ``H, W`` image size, ``C`` channels. Images are NHWC ``uint8`` until the
last step, labels are ``int64``; only a batch handed to the model is float32.

The pipeline runs in three stages so the per-batch work stays small:

1. ``load_dataset`` reads a standard format (MNIST/Fashion-MNIST IDX, the CIFAR python pickles, a folder of images)
   into a :class:`Dataset` of raw ``uint8`` images and checks the files on the way: every problem is a
   :class:`DatasetError` naming the file, what is wrong and how to get good data.
2. ``prepare`` resizes (Pillow, bilinear), zero-pads and sets the channel count once, up front, still in ``uint8``;
   ``Normalization.fit`` computes per-channel mean and std on the prepared training split and is kept (``to_dict``)
   so evaluation and prediction normalize exactly like training.
3. ``iterate_batches`` gathers a batch, augments it in ``uint8`` (random crop with padding and horizontal flip, one
   vectorized gather for the whole batch) and normalizes it into float32. A batch of 128 32x32 images costs about
   0.3 ms gray and 0.7 ms RGB (over 150k images/s), two orders of magnitude below a training step, so there is no
   background prefetch thread.

Reproducibility: every random draw is a pure function of ``(seed, epoch, batch)``. Epoch ``e``'s order comes from
``SeedSequence(seed, spawn_key=(e, 0, 0))`` and batch ``b``'s augmentation from ``spawn_key=(e, 1, b)``, so a
checkpoint that stores ``(seed, epoch, next batch)`` resumes mid-epoch bit for bit with
``iterate_batches(..., seed=seed, epoch=e, start_batch=b)``, and no generator state needs saving.
"""
import gzip
import hashlib
import os
import pickle
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

ENV_VAR = "TINYCONV_DATA"
SPLITS = ("train", "test")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))

# Where each named dataset lives: the folder name it usually has under a data root, the system-wide default (if a
# distribution packages it) and how to get it, quoted in every error about it.
_SOURCES = {
    "fashion-mnist": dict(
        subdir="fashion-mnist", system="/usr/share/datasets/fashion-mnist",
        how="install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' (into /usr/share/datasets/"
            "fashion-mnist), or put its four IDX files in a folder and pass data_dir= or set TINYCONV_DATA"),
    "mnist": dict(
        subdir="mnist", system=None,
        how="download MNIST's four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; yann.lecun.com/exdb/mnist) into a folder and "
            "pass data_dir= or set TINYCONV_DATA"),
    "cifar10": dict(
        subdir="cifar-10-batches-py", system=None,
        how="download and unpack CIFAR-10 with tinyconv.data.download_cifar('cifar10', ROOT), then pass "
            "data_dir=ROOT or set TINYCONV_DATA=ROOT"),
    "cifar100": dict(
        subdir="cifar-100-python", system=None,
        how="download and unpack CIFAR-100 with tinyconv.data.download_cifar('cifar100', ROOT), then pass "
            "data_dir=ROOT or set TINYCONV_DATA=ROOT"),
    "folder": dict(
        subdir=None, system=None,
        how="lay the images out as ROOT/<class name>/<image>.png (or .jpg), one subfolder per class, optionally "
            "under ROOT/train and ROOT/test"),
}

# The official "python version" archives and their published MD5 sums.
CIFAR_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


class DatasetError(ValueError):
    """A dataset file or folder is missing, truncated or not in the expected format.

    Attributes:
        path: the file or folder at fault.
        problem: what is wrong with it.
    """

    def __init__(self, path, problem, how=""):
        self.path = Path(path)
        self.problem = problem
        hint = f"; to fix it, {how}" if how else ""
        super().__init__(f"{path}: {problem}{hint}")


@dataclass
class Dataset:
    """One split of a labelled image dataset, held in memory.

    Attributes:
        images: (N, H, W, C) uint8, C = 1 or 3.
        labels: (N,) int64 in [0, len(class_names)).
        class_names: one name per label.
        name: dataset name, e.g. 'fashion-mnist'.
        split: 'train' or 'test' ('' when not from a standard split).
    """
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple
    name: str
    split: str = ""

    def __post_init__(self):
        self.class_names = tuple(self.class_names)
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise TypeError(f"Dataset images must be a uint8 (N, H, W, C) array, got "
                            f"{getattr(self.images, 'dtype', type(self.images).__name__)} "
                            f"{getattr(self.images, 'shape', '')}")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int64 or self.labels.ndim != 1:
            raise TypeError(f"Dataset labels must be an int64 (N,) array, got "
                            f"{getattr(self.labels, 'dtype', type(self.labels).__name__)} "
                            f"{getattr(self.labels, 'shape', '')}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Dataset has {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"Dataset labels span [{self.labels.min()}, {self.labels.max()}] but there are "
                             f"{len(self.class_names)} class names")

    def __len__(self):
        return len(self.labels)

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def image_shape(self):
        """(H, W, C) of one image."""
        return self.images.shape[1:]


# ---------------------------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------------------------

def _candidate_roots(name, data_dir):
    """Folders to search, in order: data_dir alone if given, else $TINYCONV_DATA then the system folder."""
    if data_dir is not None:
        return [Path(data_dir)]
    roots = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    if _SOURCES[name]["system"]:
        roots.append(Path(_SOURCES[name]["system"]))
    return roots


def _find_dataset_dir(name, data_dir=None, *, marker):
    """Find the folder holding dataset ``name``: a search root itself or its usual subfolder.

    Args:
        name: a key of the dataset table, e.g. 'fashion-mnist'.
        data_dir: explicit root; when given, nothing else is searched.
        marker: callable(folder) -> bool telling whether a folder holds the dataset.

    Returns:
        Path of the folder.

    Raises:
        DatasetError: no searched folder holds the dataset; the message lists every place searched.
    """
    how = _SOURCES[name]["how"]
    roots = _candidate_roots(name, data_dir)
    if not roots:
        raise DatasetError(f"${ENV_VAR}", f"not set, and no data_dir given: nowhere to look for {name}", how)
    searched = []
    for root in roots:
        subdir = _SOURCES[name]["subdir"]
        for folder in [root] + ([root / subdir] if subdir else []):
            searched.append(str(folder))
            if folder.is_dir() and marker(folder):
                return folder
    problem = f"{name} not found (searched {', '.join(searched)})"
    if data_dir is not None and not Path(data_dir).is_dir():
        problem = f"no such folder; {problem}"
    raise DatasetError(roots[0], problem, how)


def _existing(path_without_gz):
    """The file itself or its .gz twin, whichever exists, else None."""
    for p in (path_without_gz, path_without_gz.with_name(path_without_gz.name + ".gz")):
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------------------------------------------------
# IDX files: MNIST and Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim (N,)


def _read_bytes(path, how):
    """Whole file contents, gunzipped when the file is gzip (by magic bytes, not by name)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(path, "file not found", how) from None
    except OSError as e:
        raise DatasetError(path, f"cannot read the file ({e.strerror})", how) from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(path, f"corrupt gzip stream ({e})", how) from None


def read_idx(path, *, magic=None, how=""):
    """Read one IDX file (raw or gzipped) into an array of its declared type and shape.

    Header: two zero bytes, a type byte, a dimension count, then one big-endian uint32 per dimension; the payload
    follows with no padding and must have exactly the size the header declares.

    Args:
        path: the file.
        magic: required 32-bit magic number (IDX_IMAGES_MAGIC or IDX_LABELS_MAGIC), or None for any valid one.
        how: how to get good data, quoted in errors.

    Returns:
        Array of the declared shape, native byte order, writable.
    """
    data = _read_bytes(path, how)
    if len(data) < 4:
        raise DatasetError(path, f"truncated IDX header ({len(data)} bytes)", how)
    found = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if magic is not None and found != magic:
        raise DatasetError(path, f"bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}", how)
    if data[:2] != b"\0\0" or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(path, f"not an IDX file (magic number 0x{found:08x})", how)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(path, f"truncated IDX header ({len(data)} bytes, {ndim} dims need {header})", how)
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    got = len(data) - header
    if got < expected:
        raise DatasetError(path, f"truncated: header declares shape {shape} ({expected} payload bytes), file has "
                                 f"{got}", how)
    if got > expected:
        raise DatasetError(path, f"{got - expected} unexpected bytes after the {expected}-byte payload of "
                                 f"shape {shape}", how)
    x = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape)
    return x.astype(dtype.newbyteorder("="))  # a native-order, writable copy


def read_idx_split(folder, split, *, how=""):
    """Read the images and labels of one split of an MNIST-style folder.

    Args:
        folder: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` files, each raw or ``.gz``.
        split: 'train' (the train-* files) or 'test' (the t10k-* files).
        how: how to get good data, quoted in errors.

    Returns:
        images (N, H, W, 1) uint8, labels (N,) int64.
    """
    prefix = {"train": "train", "test": "t10k"}[_check_split(split)]
    paths = {}
    for kind in ("images-idx3", "labels-idx1"):
        wanted = Path(folder) / f"{prefix}-{kind}-ubyte"
        paths[kind] = _existing(wanted)
        if paths[kind] is None:
            raise DatasetError(wanted, "file not found (neither it nor its .gz twin exists)", how)
    images = read_idx(paths["images-idx3"], magic=IDX_IMAGES_MAGIC, how=how)
    labels = read_idx(paths["labels-idx1"], magic=IDX_LABELS_MAGIC, how=how)
    if len(images) != len(labels):
        raise DatasetError(paths["labels-idx1"], f"{len(labels)} labels for {len(images)} images in "
                                                 f"{paths['images-idx3'].name}", how)
    return images[..., None], labels.astype(np.int64)  # (N, H, W) -> (N, H, W, 1)


def _idx_marker(folder):
    return _existing(folder / "train-images-idx3-ubyte") is not None or \
        _existing(folder / "t10k-images-idx3-ubyte") is not None


def _check_labels(path, labels, num_classes, how):
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(path, f"labels span [{labels.min()}, {labels.max()}], expected [0, {num_classes})", how)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100, "python version"
# ---------------------------------------------------------------------------------------------------------------

def _numpy_pickle_globals():
    """The only callables a CIFAR pickle may name: numpy's array and scalar rebuilders (and latin-1 bytes)."""
    import codecs
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays, and refuses everything else.

    A pickle can run arbitrary code when loaded; CIFAR's are fetched from the internet, so only the globals a
    numpy array needs are resolved.
    """
    allowed = None

    def find_class(self, module, name):
        if _NumpyOnlyUnpickler.allowed is None:
            _NumpyOnlyUnpickler.allowed = _numpy_pickle_globals()
        try:
            return _NumpyOnlyUnpickler.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _load_pickle(path, how, required):
    """A CIFAR pickle as a dict with str keys, checked for the ``required`` keys."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DatasetError(path, "file not found", how) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise DatasetError(path, f"not a readable CIFAR pickle ({type(e).__name__}: {e})", how) from None
    if not isinstance(obj, dict):
        raise DatasetError(path, f"expected a pickled dict, found {type(obj).__name__}", how)
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in required if k not in obj]
    if missing:
        raise DatasetError(path, f"missing key(s) {missing} (has {sorted(obj)})", how)
    return obj


def _cifar_images(path, data, how):
    """(N, 3072) uint8 rows, each R then G then B plane of 32x32, -> (N, 32, 32, 3)."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(path, f"'data' must be uint8 of shape (N, 3072), found {data.dtype} {data.shape}", how)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, C, H, W) -> (N, H, W, C)


def _cifar_labels(path, batch, key, num_images, num_classes, how):
    labels = np.asarray(batch[key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(path, f"'{key}' must be a list of ints, found {labels.dtype} {labels.shape}", how)
    if len(labels) != num_images:
        raise DatasetError(path, f"{len(labels)} labels in '{key}' for {num_images} images", how)
    labels = labels.astype(np.int64)
    _check_labels(path, labels, num_classes, how)
    return labels


def _names(path, meta, key, how):
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta[key])
    if not names:
        raise DatasetError(path, f"'{key}' is empty", how)
    return names


def read_cifar10(folder, split):
    """Read one split of ``cifar-10-batches-py``.

    Args:
        folder: the folder holding data_batch_1..5, test_batch and batches.meta.
        split: 'train' (the five data batches, in order) or 'test'.

    Returns:
        images (N, 32, 32, 3) uint8, labels (N,) int64, class_names.
    """
    how = _SOURCES["cifar10"]["how"]
    folder = Path(folder)
    meta_path = folder / "batches.meta"
    class_names = _names(meta_path, _load_pickle(meta_path, how, ["label_names"]), "label_names", how)
    files = [f"data_batch_{i}" for i in range(1, 6)] if _check_split(split) == "train" else ["test_batch"]
    images, labels = [], []
    for file in files:
        path = folder / file
        batch = _load_pickle(path, how, ["data", "labels"])
        images.append(_cifar_images(path, batch["data"], how))
        labels.append(_cifar_labels(path, batch, "labels", len(images[-1]), len(class_names), how))
    return np.concatenate(images), np.concatenate(labels), class_names


def read_cifar100(folder, split, *, label_mode="fine"):
    """Read one split of ``cifar-100-python``.

    Args:
        folder: the folder holding train, test and meta.
        split: 'train' or 'test'.
        label_mode: 'fine' (100 classes) or 'coarse' (20 superclasses).

    Returns:
        images (N, 32, 32, 3) uint8, labels (N,) int64, class_names.
    """
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    how = _SOURCES["cifar100"]["how"]
    folder = Path(folder)
    key = f"{label_mode}_labels"
    meta_path = folder / "meta"
    class_names = _names(meta_path, _load_pickle(meta_path, how, [f"{label_mode}_label_names"]),
                         f"{label_mode}_label_names", how)
    path = folder / _check_split(split)
    batch = _load_pickle(path, how, ["data", key])
    images = _cifar_images(path, batch["data"], how)
    return images, _cifar_labels(path, batch, key, len(images), len(class_names), how), class_names


def _cifar_marker(name):
    first = "batches.meta" if name == "cifar10" else "meta"
    return lambda folder: (folder / first).is_file()


def extract_verified(archive, md5, root):
    """Check an archive's MD5 and unpack it into ``root`` (refusing members that would land outside it).

    Args:
        archive: path of a .tar.gz file.
        md5: expected hex digest.
        root: destination folder, created if needed.

    Raises:
        DatasetError: checksum mismatch or unreadable archive.
    """
    archive, root = Path(archive), Path(root)
    digest = hashlib.md5()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != md5:
        raise DatasetError(archive, f"MD5 {digest.hexdigest()} does not match the published {md5}; delete the file "
                                    "and download it again")
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(archive, f"cannot unpack the archive ({e})") from None


def download_cifar(name, root=None, *, force=False):
    """Download the official CIFAR "python version" archive, verify its MD5 and unpack it under ``root``.

    Args:
        name: 'cifar10' or 'cifar100'.
        root: destination folder; default $TINYCONV_DATA.
        force: download again even when the unpacked folder exists.

    Returns:
        Path of the unpacked folder (root/cifar-10-batches-py or root/cifar-100-python), ready for
        ``load_dataset(name, data_dir=root)``.
    """
    if name not in CIFAR_ARCHIVES:
        raise ValueError(f"download_cifar knows {sorted(CIFAR_ARCHIVES)}, got {name!r}")
    if root is None:
        if not os.environ.get(ENV_VAR):
            raise ValueError(f"pass root= or set {ENV_VAR} to say where to put {name}")
        root = os.environ[ENV_VAR]
    root = Path(root)
    target = root / _SOURCES[name]["subdir"]
    if target.is_dir() and not force:
        return target
    url, md5 = CIFAR_ARCHIVES[name]
    archive = root / url.rsplit("/", 1)[1]
    root.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)
    partial.replace(archive)
    extract_verified(archive, md5, root)
    archive.unlink()
    return target


# ---------------------------------------------------------------------------------------------------------------
# A folder of images, one subfolder per class
# ---------------------------------------------------------------------------------------------------------------

def _pair(name, value):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or an (H, W) pair, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return h, w


def _decode_image(path, color, size, how):
    """One image file -> (H, W, C) uint8 in ``color`` mode, resized (bilinear) to ``size`` = (H, W) if given."""
    try:
        with Image.open(path) as im:
            im = im.convert(color)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)  # Pillow sizes are (W, H)
            x = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(path, f"not a readable image ({e})", how) from None
    return x.reshape(x.shape[0], x.shape[1], -1)  # 'L' decodes to (H, W); make it (H, W, 1)


def read_image_folder(folder, *, color="RGB", image_size=None):
    """Read ``folder/<class>/<image>``: class folders sorted by name give labels 0..k-1.

    Every non-hidden file inside a class folder must be an image Pillow can decode; files directly in ``folder``
    and hidden entries are ignored.

    Args:
        folder: the root folder.
        color: 'RGB' (C = 3) or 'L' (grayscale, C = 1).
        image_size: int or (H, W) to resize every image to (bilinear); required when sizes differ.

    Returns:
        images (N, H, W, C) uint8, labels (N,) int64, class_names.
    """
    how = _SOURCES["folder"]["how"]
    if color not in ("RGB", "L"):
        raise ValueError(f"color must be 'RGB' or 'L', got {color!r}")
    size = None if image_size is None else _pair("image_size", image_size)
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "no such folder", how)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(folder, "no class subfolders", how)
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DatasetError(class_dir, "class folder holds no images", how)
        for path in files:
            x = _decode_image(path, color, size, how)
            if images and x.shape != images[0].shape:
                raise DatasetError(path, f"image is {x.shape[1]}x{x.shape[0]} (WxH) but the first one is "
                                         f"{images[0].shape[1]}x{images[0].shape[0]}; pass image_size= to resize "
                                         "all images to one size", how)
            images.append(x)
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), tuple(p.name for p in class_dirs)


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------

def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def subset_classes(dataset, classes):
    """Keep only the given classes, relabelled 0..k-1 in the order given.

    Args:
        dataset: a Dataset.
        classes: original label values, e.g. range(10) for the first ten CIFAR-100 classes.

    Returns:
        A new Dataset.
    """
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0 or max(classes) >= dataset.num_classes:
        raise ValueError(f"classes_subset must list distinct labels in [0, {dataset.num_classes}), got {classes}")
    relabel = np.full(dataset.num_classes, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    new = relabel[dataset.labels]
    keep = new >= 0
    return replace(dataset, images=dataset.images[keep], labels=new[keep],
                   class_names=tuple(dataset.class_names[c] for c in classes))


def load_dataset(name, *, split="train", data_dir=None, classes_subset=None, label_mode="fine", color="RGB",
                 image_size=None):
    """Load one split of a dataset in its standard on-disk format.

    Search: ``data_dir`` if given (only it), else ``$TINYCONV_DATA``, else the system folder (Fashion-MNIST:
    /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist). Each root is tried as is and with the
    dataset's usual subfolder (fashion-mnist, mnist, cifar-10-batches-py, cifar-100-python).

    Args:
        name: 'fashion-mnist', 'mnist', 'cifar10', 'cifar100' or 'folder'.
        split: 'train' or 'test'. For 'folder', data_dir/<split> is read when it exists, else data_dir itself.
        data_dir: folder to read from.
        classes_subset: original labels to keep, relabelled 0..k-1 in the order given.
        label_mode: 'fine' or 'coarse' (cifar100 only).
        color: 'RGB' or 'L' ('folder' only).
        image_size: int or (H, W) to resize images to while reading ('folder' only).

    Returns:
        Dataset with uint8 (N, H, W, C) images.

    Raises:
        DatasetError: missing, truncated or malformed files (the message names the file and how to get the data).
    """
    if name not in _SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(_SOURCES)}")
    _check_split(split)
    if label_mode != "fine" and name != "cifar100":
        raise ValueError(f"label_mode applies to cifar100 only, not {name!r}")
    if (color != "RGB" or image_size is not None) and name != "folder":
        raise ValueError(f"color and image_size apply to 'folder' only, not {name!r}; use prepare() to resize")
    how = _SOURCES[name]["how"]
    if name in ("fashion-mnist", "mnist"):
        folder = _find_dataset_dir(name, data_dir, marker=_idx_marker)
        images, labels = read_idx_split(folder, split, how=how)
        class_names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
        _check_labels(folder, labels, len(class_names), how)
    elif name == "cifar10":
        folder = _find_dataset_dir(name, data_dir, marker=_cifar_marker(name))
        images, labels, class_names = read_cifar10(folder, split)
    elif name == "cifar100":
        folder = _find_dataset_dir(name, data_dir, marker=_cifar_marker(name))
        images, labels, class_names = read_cifar100(folder, split, label_mode=label_mode)
    else:
        if data_dir is None:
            raise ValueError("load_dataset('folder') needs data_dir=")
        root = Path(data_dir)
        folder = root / split if (root / split).is_dir() else root
        images, labels, class_names = read_image_folder(folder, color=color, image_size=image_size)
    dataset = Dataset(images=images, labels=labels, class_names=class_names, name=name, split=split)
    return dataset if classes_subset is None else subset_classes(dataset, classes_subset)


def split_holdout(dataset, count, *, seed):
    """Split off ``count`` random examples, e.g. a validation set from the training split.

    Returns:
        (rest, held_out), two Datasets; the same seed always holds out the same examples.
    """
    if not 0 < count < len(dataset):
        raise ValueError(f"count must be in (0, {len(dataset)}), got {count}")
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, 0, 0))).permutation(len(dataset))
    held, rest = np.sort(order[:count]), np.sort(order[count:])
    return (replace(dataset, images=dataset.images[rest], labels=dataset.labels[rest]),
            replace(dataset, images=dataset.images[held], labels=dataset.labels[held]))


# ---------------------------------------------------------------------------------------------------------------
# Up-front transforms (uint8 in, uint8 out, once per dataset)
# ---------------------------------------------------------------------------------------------------------------

def resize_images(images, size):
    """Resize every image with Pillow's bilinear filter.

    Args:
        images: (N, H, W, C) uint8, C = 1 or 3.
        size: int or (OH, OW).

    Returns:
        (N, OH, OW, C) uint8.
    """
    oh, ow = _pair("resize", size)
    n, h, w, c = images.shape
    if (h, w) == (oh, ow):
        return images
    if c not in (1, 3):
        raise ValueError(f"resize needs 1 or 3 channels, got {c}")
    out = np.empty((n, oh, ow, c), dtype=np.uint8)
    mode = "L" if c == 1 else "RGB"
    for i in range(n):
        im = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i], mode)
        out[i] = np.asarray(im.resize((ow, oh), Image.Resampling.BILINEAR)).reshape(oh, ow, c)  # Pillow: (W, H)
    return out


def pad_images(images, size):
    """Zero-pad every image to ``size``, centred (an odd extra row or column goes bottom/right).

    Args:
        images: (N, H, W, C) uint8.
        size: int or (OH, OW) with OH >= H and OW >= W.

    Returns:
        (N, OH, OW, C) uint8.
    """
    oh, ow = _pair("pad_to", size)
    n, h, w, c = images.shape
    if oh < h or ow < w:
        raise ValueError(f"pad_to {(oh, ow)} is smaller than the images ({h}, {w}); use resize to shrink")
    top, left = (oh - h) // 2, (ow - w) // 2
    out = np.zeros((n, oh, ow, c), dtype=images.dtype)
    out[:, top:top + h, left:left + w] = images
    return out


def set_channels(images, channels):
    """Grayscale -> 3 channels by repetition, or RGB -> 1 channel by ITU-R 601-2 luma (as Pillow's 'L').

    Args:
        images: (N, H, W, C) uint8, C = 1 or 3.
        channels: 1 or 3.

    Returns:
        (N, H, W, channels) uint8.
    """
    c = images.shape[3]
    if channels not in (1, 3) or c not in (1, 3):
        raise ValueError(f"channels must go between 1 and 3, got {c} -> {channels}")
    if c == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=3)
    luma = images.astype(np.uint32) @ np.array([299, 587, 114], dtype=np.uint32)  # (N, H, W)
    return ((luma + 500) // 1000).astype(np.uint8)[..., None]


def prepare(dataset, *, resize=None, pad_to=None, in_channels=None):
    """Apply the up-front transforms once: resize, then zero-pad, then set the channel count.

    The result is held in memory as uint8 and reused every epoch; nothing here runs per batch.

    Args:
        dataset: a Dataset.
        resize: int or (H, W) to resize to (Pillow bilinear), or None.
        pad_to: int or (H, W) to zero-pad to, centred (e.g. 28 -> 32), or None.
        in_channels: 1 or 3, or None to keep the dataset's channels.

    Returns:
        A new Dataset (or the same one when nothing changes).
    """
    images = dataset.images
    if resize is not None:
        images = resize_images(images, resize)
    if pad_to is not None:
        images = pad_images(images, pad_to)
    if in_channels is not None:
        images = set_channels(images, in_channels)
    return dataset if images is dataset.images else replace(dataset, images=images)


# ---------------------------------------------------------------------------------------------------------------
# Per-batch transforms: normalization and augmentation
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x / 255 - mean) / std``, with mean and std in the [0, 1] pixel scale.

    Fit it on the prepared training split and store ``to_dict()`` with the model, so evaluation and prediction
    normalize exactly as training did.

    Attributes:
        mean: one float per channel.
        std: one float per channel.
    """
    mean: tuple
    std: tuple

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean or min(self.std) <= 0:
            raise ValueError(f"Normalization needs one mean and one positive std per channel, got mean={self.mean} "
                             f"std={self.std}")

    @classmethod
    def fit(cls, images, *, chunk=4096):
        """Mean and std per channel over every pixel of ``images`` (N, H, W, C) uint8, in float64.

        A channel that is constant gets std 1 (there is nothing to scale).
        """
        if images.dtype != np.uint8 or images.ndim != 4:
            raise TypeError(f"Normalization.fit needs uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
        c = images.shape[3]
        total, total_sq = np.zeros(c), np.zeros(c)
        for start in range(0, len(images), chunk):  # chunks keep the float64 temporaries small
            block = images[start:start + chunk].reshape(-1, c).astype(np.float64)  # (chunk*H*W, C)
            total += block.sum(axis=0)
            total_sq += np.einsum("ij,ij->j", block, block)
        count = images.size // c
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))  # E[x^2] - E[x]^2 is exact enough: x <= 255
        std[std < 1e-3] = 255.0  # a constant channel: std 1 in the [0, 1] scale
        return cls(mean=mean / 255.0, std=std / 255.0)

    def to_dict(self):
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d):
        return cls(mean=d["mean"], std=d["std"])

    def __call__(self, images):
        """(N, H, W, C) uint8 -> (N, H, W, C) float32, C-contiguous."""
        n, h, w, c = images.shape
        if c != len(self.mean):
            raise ValueError(f"images have {c} channels but the normalization has {len(self.mean)}")
        scale = 1.0 / (255.0 * np.asarray(self.std, dtype=np.float64))
        shift = -np.asarray(self.mean) / np.asarray(self.std)
        x = images.astype(np.float32)
        rows = x.reshape(n * h, w * c)  # (NH, WC): tiling the per-channel constants along W*C keeps the inner
        rows *= np.tile(scale, w).astype(np.float32)  # loop long; broadcasting over C alone would loop over 3
        rows += np.tile(shift, w).astype(np.float32)
        return x


def _crop_sources(size, padding, mode):
    """Source positions of every crop window along one axis.

    Row ``s`` of the result lists, for the window that starts ``s`` pixels into the padded axis, which position
    of the source axis each output pixel reads: with 'reflect' the source is the unpadded axis (mirrored indices,
    as numpy's 'reflect'), with 'zero' it is the axis already zero-padded by ``padding`` on both sides.

    Returns:
        (2 padding + 1, size) int array.
    """
    pos = np.arange(2 * padding + 1)[:, None] + np.arange(size) - padding  # in unpadded coordinates
    if mode == "zero":
        return pos + padding
    pos = np.abs(pos)
    return np.where(pos >= size, 2 * (size - 1) - pos, pos)


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop after padding, then random horizontal flip.

    Attributes:
        crop_padding: pixels of padding on each side before a random crop back to the original size (0: no crop).
        pad_mode: 'reflect' (mirror without repeating the edge) or 'zero' (black pixels, value 0 before
            normalization, as torchvision's RandomCrop(padding=4)).
        flip: flip horizontally with probability 1/2.
    """
    crop_padding: int = 4
    pad_mode: str = "reflect"
    flip: bool = True

    def __post_init__(self):
        if self.pad_mode not in ("reflect", "zero"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zero', got {self.pad_mode!r}")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")

    def __call__(self, images, rng):
        """Augment a batch in one gather.

        Each output pixel reads one source byte; its flat index is a row part (batch offset and source row,
        chosen by the vertical crop offset) plus a column part (source column times C plus channel, chosen by the
        horizontal offset and the flip). Both parts come from small tables, so the batch costs one broadcast add
        and one ``np.take``, with inner loops W*C long.

        Args:
            images: (B, H, W, C) uint8.
            rng: numpy Generator.

        Returns:
            (B, H, W, C) uint8, a new array.
        """
        b, h, w, c = images.shape
        p = self.crop_padding
        if self.pad_mode == "reflect" and p >= min(h, w):
            raise ValueError(f"reflect padding {p} needs images larger than {p}, got {h}x{w}")
        dy = rng.integers(0, 2 * p + 1, size=b)
        dx = rng.integers(0, 2 * p + 1, size=b)
        flip = rng.random(b) < 0.5 if self.flip else np.zeros(b, dtype=bool)
        source = np.ascontiguousarray(images)
        if self.pad_mode == "zero" and p:
            source = pad_images(source, (h + 2 * p, w + 2 * p))
        sh, sw = source.shape[1:3]
        row_src = _crop_sources(h, p, self.pad_mode)  # (2p+1, H)
        col_src = _crop_sources(w, p, self.pad_mode)  # (2p+1, W)
        cols = np.where(flip[:, None], col_src[dx, ::-1], col_src[dx])  # (B, W)
        row_part = row_src[dy] * (sw * c) + (np.arange(b) * (sh * sw * c))[:, None]  # (B, H)
        col_part = (cols[:, :, None] * c + np.arange(c)).reshape(b, w * c)  # (B, W*C)
        index = row_part[:, :, None] + col_part[:, None, :]  # (B, H, W*C)
        return np.take(source.reshape(-1), index).reshape(b, h, w, c)


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------

def _generator(seed, *key):
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def epoch_order(n, *, seed, epoch, shuffle=True):
    """The order in which epoch ``epoch`` visits ``n`` examples: a permutation drawn from (seed, epoch) alone."""
    if not shuffle:
        return np.arange(n)
    return _generator(seed, epoch, 0, 0).permutation(n)


def num_batches(n, batch_size, *, drop_last=False):
    """Batches per epoch over ``n`` examples."""
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(arrays, batch_size, *, shuffle=True, seed=0, epoch=0, start_batch=0, drop_last=False,
                    augment=None, normalization=None):
    """Yield the batches of one epoch.

    Args:
        arrays: (images, labels): (N, H, W, C) uint8 and (N,) integer labels, e.g. (ds.images, ds.labels).
        batch_size: examples per batch; the last batch is smaller unless drop_last.
        shuffle: visit examples in a random order drawn from (seed, epoch); else in order.
        seed: the data seed.
        epoch: the epoch number, part of the random state.
        start_batch: skip the first batches (resume mid-epoch; the rest are the same as in an uninterrupted run).
        drop_last: drop a final incomplete batch.
        augment: an Augment, or None.
        normalization: a Normalization; None only scales to [0, 1].

    Yields:
        x (B, H, W, C) float32 C-contiguous, y (B,) int64.
    """
    images, labels = arrays
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise TypeError(f"images must be a uint8 (N, H, W, C) array, got {getattr(images, 'dtype', type(images))} "
                        f"{getattr(images, 'shape', '')}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if normalization is None:
        normalization = Normalization(mean=(0.0,) * images.shape[3], std=(1.0,) * images.shape[3])
    order = epoch_order(len(images), seed=seed, epoch=epoch, shuffle=shuffle)
    for b in range(start_batch, num_batches(len(images), batch_size, drop_last=drop_last)):
        index = order[b * batch_size:(b + 1) * batch_size]
        x = images[index]  # (B, H, W, C) uint8
        if augment is not None:
            x = augment(x, _generator(seed, epoch, 1, b))
        yield normalization(x), labels[index].astype(np.int64)
