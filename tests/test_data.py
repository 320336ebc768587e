"""Data layer: readers round-trip small files in every format, corrupt files raise DatasetError naming the file,
transforms match a plain reference, and batches are complete, reproducible and resumable."""
import gzip
import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyconv import data
from tinyconv.data import (Augment, Dataset, DatasetError, Normalization, epoch_order, extract_verified,
                           iterate_batches, load_dataset, num_batches, pad_images, prepare, read_idx, resize_images,
                           set_channels, split_holdout, subset_classes)

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_env_data(monkeypatch):
    """Tests choose their own folders: neither $TINYCONV_DATA nor the system Fashion-MNIST may leak in."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setitem(data._SOURCES["fashion-mnist"], "system", None)


# ---------------------------------------------------------------------------------------------------------------
# Writers for each format
# ---------------------------------------------------------------------------------------------------------------

def idx_bytes(x, type_code=0x08):
    header = bytes([0, 0, type_code, x.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in x.shape)
    return header + x.astype(data._IDX_DTYPES[type_code]).tobytes()


def write_file(path, payload, gz):
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_mnist(folder, *, n_train=7, n_test=5, h=4, w=3, gz=True, seed=0):
    """An MNIST-style folder; returns {split: (images (N, H, W), labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_file(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write_file(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        out[split] = (images, labels)
    return out


def cifar_rows(images):
    """(N, 32, 32, 3) -> (N, 3072) rows in CIFAR's plane order (all R, then G, then B)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(folder, *, per_batch=3, seed=0, protocol=pickle.DEFAULT_PROTOCOL):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f, protocol=protocol)
    out = {"train": ([], []), "test": ([], [])}
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / file, "wb") as f:
            pickle.dump({b"batch_label": file.encode(), b"labels": labels, b"data": cifar_rows(images)}, f,
                        protocol=protocol)
        split = "test" if file == "test_batch" else "train"
        out[split][0].append(images)
        out[split][1].extend(labels)
    return {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in out.items()}, names


def write_cifar100(folder, *, n=12, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_names = [f"coarse{i}" for i in range(20)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, f)  # str keys work too
    out = {}
    for split in ("train", "test"):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 5, n)  # few classes, so a subset of them is not empty
        coarse = rng.integers(0, 20, n)
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": cifar_rows(images), b"fine_labels": fine.tolist(),
                         b"coarse_labels": coarse.tolist()}, f)
        out[split] = (images, fine, coarse)
    return out, fine_names, coarse_names


# ---------------------------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    written = write_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset("mnist", split=split, data_dir=tmp_path)
        images, labels = written[split]
        assert ds.images.dtype == np.uint8 and ds.images.shape == images.shape + (1,)
        np.testing.assert_array_equal(ds.images[..., 0], images)
        assert ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.class_names == tuple("0123456789") and ds.name == "mnist" and ds.split == split


def test_idx_other_types_and_native_order(tmp_path):
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7
    path = write_file(tmp_path / "x.idx", idx_bytes(x, type_code=0x0C), gz=False)
    y = read_idx(path)
    np.testing.assert_array_equal(y, x)
    assert y.dtype.isnative and y.flags.writeable


def test_fashion_mnist_class_names_and_search_order(tmp_path, monkeypatch):
    explicit = write_mnist(tmp_path / "explicit", seed=1)
    env = write_mnist(tmp_path / "env" / "fashion-mnist", seed=2)  # the usual subfolder of a data root
    system = write_mnist(tmp_path / "system", seed=3)
    monkeypatch.setitem(data._SOURCES["fashion-mnist"], "system", str(tmp_path / "system"))

    def first_label_row(**kw):
        return load_dataset("fashion-mnist", split="train", **kw).labels

    assert load_dataset("fashion-mnist").class_names[:2] == ("T-shirt/top", "Trouser")
    np.testing.assert_array_equal(first_label_row(), system["train"][1])
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    np.testing.assert_array_equal(first_label_row(), env["train"][1])
    np.testing.assert_array_equal(first_label_row(data_dir=tmp_path / "explicit"), explicit["train"][1])
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "empty"))  # an env root without the data falls through
    np.testing.assert_array_equal(first_label_row(), system["train"][1])


def test_fashion_mnist_missing_everywhere_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist")
    message = str(e.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert isinstance(e.value, ValueError)


def corrupt_cases():
    """name -> (file to damage, function(path) damaging it)."""
    def bad_magic(p):
        raw = gzip.decompress(p.read_bytes())
        p.write_bytes(gzip.compress(b"\0\0\x08\x02" + raw[4:]))

    def truncated(p):
        raw = gzip.decompress(p.read_bytes())
        p.write_bytes(gzip.compress(raw[:-5]))

    def trailing(p):
        p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + b"\0"))

    def bad_gzip(p):
        p.write_bytes(p.read_bytes()[:20])

    def garbage_gzip(p):
        p.write_bytes(b"\x1f\x8b" + b"not really gzip" * 4)

    def count_mismatch(p):
        p.write_bytes(gzip.compress(idx_bytes(np.zeros(6, dtype=np.uint8))))

    def header_only(p):
        p.write_bytes(gzip.compress(b"\0\0\x08"))

    return {
        "bad magic": ("train-images-idx3-ubyte.gz", bad_magic, "magic"),
        "truncated": ("train-images-idx3-ubyte.gz", truncated, "truncated"),
        "trailing bytes": ("train-images-idx3-ubyte.gz", trailing, "unexpected bytes"),
        "bad gzip": ("train-labels-idx1-ubyte.gz", bad_gzip, "gzip"),
        "garbage gzip": ("train-labels-idx1-ubyte.gz", garbage_gzip, "gzip"),
        "count mismatch": ("train-labels-idx1-ubyte.gz", count_mismatch, "6 labels for 7 images"),
        "short header": ("train-labels-idx1-ubyte.gz", header_only, "truncated IDX header"),
        "missing file": ("train-labels-idx1-ubyte.gz", lambda p: p.unlink(), "file not found"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_idx_corrupt_files_raise_naming_the_file(tmp_path, case):
    file, damage, words = corrupt_cases()[case]
    write_mnist(tmp_path)
    damage(tmp_path / file)
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", split="train", data_dir=tmp_path)
    assert str(tmp_path / file.removesuffix(".gz")) in str(e.value)
    assert words in str(e.value)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)


def test_nowhere_to_look_raises():
    with pytest.raises(DatasetError, match=r"\$TINYCONV_DATA: not set, and no data_dir given: nowhere to look"):
        load_dataset("mnist")


def test_missing_folder_raises(tmp_path):
    with pytest.raises(DatasetError, match="no such folder") as e:
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "yann.lecun.com" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar10_round_trip(tmp_path, protocol):
    written, names = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    for split in ("train", "test"):
        ds = load_dataset("cifar10", split=split, data_dir=tmp_path)  # the root: its usual subfolder is found
        np.testing.assert_array_equal(ds.images, written[split][0])
        np.testing.assert_array_equal(ds.labels, written[split][1])
        assert ds.images.flags.c_contiguous and ds.labels.dtype == np.int64 and ds.class_names == tuple(names)
    assert len(load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py")) == 15  # or the folder itself


def test_cifar10_class_subset(tmp_path):
    written, names = write_cifar10(tmp_path / "c10", per_batch=20)
    ds = load_dataset("cifar10", data_dir=tmp_path / "c10", classes_subset=[3, 1])
    keep = np.isin(written["train"][1], [3, 1])
    np.testing.assert_array_equal(ds.images, written["train"][0][keep])
    np.testing.assert_array_equal(ds.labels, np.where(written["train"][1][keep] == 3, 0, 1))
    assert ds.class_names == ("class3", "class1")


def test_cifar100_fine_coarse_and_subset(tmp_path):
    written, fine_names, coarse_names = write_cifar100(tmp_path / "cifar-100-python")
    images, fine, coarse = written["test"]
    ds = load_dataset("cifar100", split="test", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, fine)
    assert ds.num_classes == 100 and ds.class_names[4] == "fine4"
    ds = load_dataset("cifar100", split="test", data_dir=tmp_path, label_mode="coarse")
    np.testing.assert_array_equal(ds.labels, coarse)
    assert ds.class_names == tuple(coarse_names)
    ds = load_dataset("cifar100", split="train", data_dir=tmp_path, classes_subset=range(3))
    keep = written["train"][1] < 3
    np.testing.assert_array_equal(ds.labels, written["train"][1][keep])
    np.testing.assert_array_equal(ds.images, written["train"][0][keep])
    assert ds.class_names == ("fine0", "fine1", "fine2")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def cifar_corruptions():
    def truncated(p):
        p.write_bytes(p.read_bytes()[:100])

    def missing_key(p):
        p.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8)}))

    def count_mismatch(p):
        p.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]}))

    def wrong_shape(p):
        p.write_bytes(pickle.dumps({b"data": np.zeros((3, 3000), np.uint8), b"labels": [1, 2, 3]}))

    def bad_label(p):
        p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}))

    def evil(p):
        p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))

    return {
        "truncated": ("data_batch_2", truncated, "not a readable CIFAR pickle"),
        "missing key": ("data_batch_3", missing_key, "missing key(s) ['labels']"),
        "count mismatch": ("test_batch", count_mismatch, "2 labels in 'labels' for 3 images"),
        "wrong shape": ("test_batch", wrong_shape, "(N, 3072)"),
        "label out of range": ("test_batch", bad_label, "labels span [1, 10]"),
        "code in pickle": ("test_batch", evil, "refusing to load global"),
        "missing meta": ("batches.meta", lambda p: p.unlink(), "not found"),
        "missing batch": ("data_batch_5", lambda p: p.unlink(), "file not found"),
    }


@pytest.mark.parametrize("case", list(cifar_corruptions()))
def test_cifar_corrupt_files_raise_naming_the_file(tmp_path, case):
    file, damage, words = cifar_corruptions()[case]
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    damage(folder / file)
    split = "test" if file == "test_batch" else "train"
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", split=split, data_dir=folder)
    if case != "missing meta":  # without batches.meta the folder is no CIFAR-10 folder: the error names the folder
        assert str(folder / file) in str(e.value)
    else:
        assert str(folder) in str(e.value)
    assert words in str(e.value) and "download_cifar" in str(e.value)


def test_extract_verified(tmp_path):
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    (src / "batches.meta").write_bytes(b"meta")
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    extract_verified(archive, md5, tmp_path / "root")
    assert (tmp_path / "root" / "cifar-10-batches-py" / "batches.meta").read_bytes() == b"meta"
    with pytest.raises(DatasetError, match="does not match") as e:
        extract_verified(archive, "0" * 32, tmp_path / "other")
    assert str(archive) in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------------------------

def write_folder(root, *, size=(6, 5), seed=0):
    """root/<class>/<i>.png|.jpg; returns the expected (images, labels, class names) as Pillow decodes them."""
    rng = np.random.default_rng(seed)
    classes = ["zebra", "ant", "moth"]  # sorted: ant=0, moth=1, zebra=2
    expected = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(3):
            x = rng.integers(0, 256, size + (3,), dtype=np.uint8)
            ext = "png" if i != 1 else "jpg"
            path = root / name / f"{i}.{ext}"
            Image.fromarray(x).save(path)
            expected[path] = x if ext == "png" else np.asarray(Image.open(path).convert("RGB"))  # JPEG is lossy
    (root / "ant" / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    (root / "README.txt").write_text("files beside the class folders are ignored")
    order = sorted(expected, key=lambda p: (p.parent.name, p.name))
    labels = [sorted(classes).index(p.parent.name) for p in order]
    return np.stack([expected[p] for p in order]), np.array(labels), tuple(sorted(classes))


def test_image_folder_round_trip(tmp_path):
    images, labels, names = write_folder(tmp_path / "train")
    ds = load_dataset("folder", split="train", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.class_names == names == ("ant", "moth", "zebra") and ds.labels.dtype == np.int64
    gray = load_dataset("folder", split="test", data_dir=tmp_path / "train", color="L")  # no test/: root itself
    assert gray.images.shape == (9, 6, 5, 1)
    first = sorted((tmp_path / "train" / "ant").glob("[0-9]*"))[0]
    np.testing.assert_array_equal(gray.images[0, :, :, 0], np.asarray(Image.open(first).convert("L")))
    small = load_dataset("folder", data_dir=tmp_path, image_size=(4, 3))
    assert small.images.shape == (9, 4, 3, 3)


def test_image_folder_errors(tmp_path):
    write_folder(tmp_path)
    bad = tmp_path / "moth" / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(DatasetError, match="not a readable image") as e:
        load_dataset("folder", data_dir=tmp_path)
    assert str(bad) in str(e.value)
    bad.unlink()
    odd = tmp_path / "zebra" / "9.png"
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(odd)
    with pytest.raises(DatasetError, match="image_size") as e:
        load_dataset("folder", data_dir=tmp_path)
    assert str(odd) in str(e.value)
    assert len(load_dataset("folder", data_dir=tmp_path, image_size=7)) == 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_dataset("folder", data_dir=tmp_path, image_size=7)
    with pytest.raises(DatasetError, match="no such folder") as e:
        load_dataset("folder", data_dir=tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)


def test_load_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", split="validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="cifar100 only"):
        load_dataset("mnist", label_mode="coarse", data_dir=tmp_path)
    with pytest.raises(ValueError, match="classes_subset"):
        write_mnist(tmp_path)
        load_dataset("mnist", data_dir=tmp_path, classes_subset=[1, 1])


def test_dataset_checks_its_arrays():
    with pytest.raises(TypeError, match="uint8"):
        Dataset(np.zeros((2, 3, 3, 1), np.float32), np.zeros(2, np.int64), ("a",), "x")
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        Dataset(np.zeros((2, 3, 3, 1), np.uint8), np.zeros(3, np.int64), ("a",), "x")
    with pytest.raises(ValueError, match="class names"):
        Dataset(np.zeros((2, 3, 3, 1), np.uint8), np.array([0, 1]), ("a",), "x")


def test_subset_and_holdout():
    ds = Dataset(np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1), np.arange(20) % 4, "abcd", "toy")
    sub = subset_classes(ds, [2])
    np.testing.assert_array_equal(sub.images.ravel(), [2, 6, 10, 14, 18])
    assert sub.class_names == ("c",) and (sub.labels == 0).all()
    rest, held = split_holdout(ds, 5, seed=1)
    assert len(rest) == 15 and len(held) == 5
    assert sorted(np.concatenate([rest.images.ravel(), held.images.ravel()])) == list(range(20))
    np.testing.assert_array_equal(split_holdout(ds, 5, seed=1)[1].images, held.images)


# ---------------------------------------------------------------------------------------------------------------
# Up-front transforms
# ---------------------------------------------------------------------------------------------------------------

def test_pad_centres_with_zeros():
    x = np.arange(1, 2 * 28 * 28 + 1).reshape(2, 28, 28, 1).astype(np.uint8)
    y = pad_images(x, 32)
    assert y.shape == (2, 32, 32, 1)
    np.testing.assert_array_equal(y[:, 2:30, 2:30], x)
    assert y.sum(dtype=np.int64) == x.sum(dtype=np.int64)
    assert pad_images(np.ones((1, 2, 2, 1), np.uint8), (5, 3))[0, :, :, 0].tolist() == \
        [[0, 0, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]]  # extra row and column: bottom, right
    with pytest.raises(ValueError, match="smaller"):
        pad_images(x, 20)


def test_resize_matches_pillow_bilinear():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    y = resize_images(x, (32, 30))
    assert y.shape == (3, 32, 30, 3) and y.dtype == np.uint8
    np.testing.assert_array_equal(y[1], np.asarray(Image.fromarray(x[1]).resize((30, 32), Image.BILINEAR)))
    g = resize_images(x[..., :1], 14)
    assert g.shape == (3, 14, 14, 1)


def test_channels():
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
    rgb = set_channels(x, 3)
    assert rgb.shape == (2, 4, 4, 3) and all((rgb[..., c] == x[..., 0]).all() for c in range(3))
    back = set_channels(rgb, 1)
    np.testing.assert_array_equal(back, x)  # luma of a gray pixel is itself
    colour = np.random.default_rng(1).integers(0, 256, (1, 5, 5, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(colour[0]).convert("L")).astype(int)
    assert np.abs(set_channels(colour, 1)[0, :, :, 0].astype(int) - pillow).max() <= 1


def test_prepare_chain():
    ds = Dataset(np.full((4, 28, 28, 1), 9, np.uint8), np.arange(4), "abcd", "toy")
    assert prepare(ds) is ds
    p = prepare(ds, pad_to=32, in_channels=3)
    assert p.images.shape == (4, 32, 32, 3) and p.images[0, 0, 0, 0] == 0 and p.images[0, 16, 16, 2] == 9
    r = prepare(ds, resize=16, pad_to=(20, 18), in_channels=1)
    assert r.images.shape == (4, 20, 18, 1) and p.labels is ds.labels


# ---------------------------------------------------------------------------------------------------------------
# Normalization and augmentation
# ---------------------------------------------------------------------------------------------------------------

def test_normalization_stats_and_round_trip():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 5, 4, 3), dtype=np.uint8)
    x[..., 2] //= 4  # a different distribution per channel
    norm = Normalization.fit(x, chunk=3)  # chunk boundaries must not change the result
    pixels = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(norm.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.std, pixels.std(axis=0), rtol=1e-9)
    y = norm(x)
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.c_contiguous
    np.testing.assert_allclose(y.reshape(-1, 3).mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(y.reshape(-1, 3).std(axis=0), 1, atol=1e-5)
    np.testing.assert_allclose(y, (x / 255.0 - np.array(norm.mean)) / np.array(norm.std), rtol=1e-5, atol=1e-5)
    assert Normalization.from_dict(norm.to_dict()) == norm
    constant = Normalization.fit(np.full((2, 3, 3, 1), 7, np.uint8))
    assert constant.std == (1.0,) and np.allclose(constant(np.full((1, 1, 1, 1), 7, np.uint8)), 0, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        norm(x[..., :1])


def reference_crops(image, padding, mode):
    """Every (dy, dx, flip) crop of ``image`` the augmentation may produce, by np.pad and slicing."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)),
                    mode="reflect" if mode == "reflect" else "constant")
    crops = {}
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            crops[(dy, dx, False)] = crop
            crops[(dy, dx, True)] = crop[:, ::-1]
    return crops


@pytest.mark.parametrize("mode", ["reflect", "zero"])
@pytest.mark.parametrize("channels", [1, 3])
def test_augment_outputs_are_crops_and_flips_of_the_input(mode, channels):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 6, 7, channels), dtype=np.uint8)
    aug = Augment(crop_padding=2, pad_mode=mode)
    y = aug(x, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == np.uint8
    seen = set()
    for image, out in zip(x, y):
        matches = [k for k, crop in reference_crops(image, 2, mode).items() if np.array_equal(crop, out)]
        assert len(matches) == 1  # random pixels: exactly one (dy, dx, flip) reproduces the output
        seen.add(matches[0])
    assert len({k[2] for k in seen}) == 2 and len({k[:2] for k in seen}) > 10  # both flips, many offsets
    np.testing.assert_array_equal(aug(x, np.random.default_rng(1)), y)  # same seed, same batch
    assert not np.array_equal(aug(x, np.random.default_rng(2)), y)


def test_augment_on_a_tiny_known_image():
    image = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)[None, :, :, None]  # (1, 2, 3, 1)
    batch = np.repeat(image, 32, axis=0)
    flips = Augment(crop_padding=0)(batch, np.random.default_rng(0))[:, :, :, 0]
    assert {tuple(map(tuple, f)) for f in flips} == {((1, 2, 3), (4, 5, 6)), ((3, 2, 1), (6, 5, 4))}
    crops = Augment(crop_padding=1, pad_mode="zero", flip=False)(batch, np.random.default_rng(0))[:, :, :, 0]
    found = {tuple(map(tuple, c)) for c in crops}
    assert ((0, 0, 0), (0, 1, 2)) in found  # the window at the top-left corner of the padded image
    assert ((5, 6, 0), (0, 0, 0)) in found  # bottom-right
    assert all(c.sum() <= 21 for c in crops)
    with pytest.raises(ValueError, match="reflect padding"):
        Augment(crop_padding=2)(batch, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------

def toy_arrays(n=103):
    images = (np.arange(n) % 256).astype(np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    return images, np.arange(n, dtype=np.int64)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_cover_every_example_once(drop_last):
    arrays = toy_arrays()
    batches = list(iterate_batches(arrays, 10, seed=3, epoch=0, drop_last=drop_last))
    assert len(batches) == num_batches(103, 10, drop_last=drop_last) == (10 if drop_last else 11)
    seen = np.concatenate([y for _, y in batches])
    assert len(seen) == (100 if drop_last else 103) and len(set(seen.tolist())) == len(seen)
    for x, y in batches:
        assert x.dtype == np.float32 and x.flags.c_contiguous and y.dtype == np.int64
        np.testing.assert_allclose(x[:, 0, 0, 0], (y % 256) / 255.0, rtol=1e-6)  # images travel with labels
    assert not np.array_equal(seen[:10], np.arange(10))  # shuffled


def test_batch_order_is_a_function_of_seed_and_epoch():
    arrays = toy_arrays()

    def labels(**kw):
        return np.concatenate([y for _, y in iterate_batches(arrays, 16, **kw)])

    np.testing.assert_array_equal(labels(seed=1, epoch=2), labels(seed=1, epoch=2))
    np.testing.assert_array_equal(labels(seed=1, epoch=2), epoch_order(103, seed=1, epoch=2))
    assert not np.array_equal(labels(seed=1, epoch=2), labels(seed=1, epoch=3))
    assert not np.array_equal(labels(seed=1, epoch=0), labels(seed=0, epoch=1))
    np.testing.assert_array_equal(labels(shuffle=False), np.arange(103))


def test_resume_mid_epoch_reproduces_the_rest():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    arrays = (images, rng.integers(0, 10, 50))
    norm = Normalization.fit(images)
    kw = dict(seed=7, epoch=4, augment=Augment(crop_padding=2), normalization=norm)
    full = list(iterate_batches(arrays, 8, **kw))
    resumed = list(iterate_batches(arrays, 8, start_batch=3, **kw))
    assert len(resumed) == len(full) - 3
    for (x0, y0), (x1, y1) in zip(full[3:], resumed):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)


def test_iterate_batches_rejects_bad_input():
    images, labels = toy_arrays(5)
    with pytest.raises(TypeError, match="uint8"):
        next(iterate_batches((images.astype(np.float32), labels), 2))
    with pytest.raises(ValueError, match="labels"):
        next(iterate_batches((images, labels[:3]), 2))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches((images, labels), 0))


# ---------------------------------------------------------------------------------------------------------------
# The real thing
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    train = load_dataset("fashion-mnist", split="train", data_dir=FASHION)
    test = load_dataset("fashion-mnist", split="test", data_dir=FASHION)
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.num_classes == 10 and train.class_names[9] == "Ankle boot"
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    norm = Normalization.fit(train.images)
    assert 0.27 < norm.mean[0] < 0.30 and 0.33 < norm.std[0] < 0.37  # the published 0.2860 / 0.3530
