import io
import pickle
import re
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rescomp.config import AugmentConfig, DataConfig
from rescomp.data import BatchLoader, load_splits, prepare, random_crop, random_flip
from rescomp.errors import DataError


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    g = torch.Generator().manual_seed(0)  # replay the offsets the crop drew
    oy, ox = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, oy[i]:oy[i] + 6, ox[i]:ox[i] + 6])
    assert torch.equal(random_crop(x, 0, g), x)


def test_flip_mirrors_exactly_the_drawn_images():
    x = torch.randn(64, 3, 4, 4)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all() and 10 < flipped.sum() < 54


def _loader(train=True, seed=0, **kw):
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    y = torch.arange(50) % 10
    return BatchLoader(x, y, 16, mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"), train=train,
                       augment=AugmentConfig(rotate_degrees=10), seed=seed, **kw)


def test_loader_epochs_are_reproducible_and_differ():
    a, b = _loader(), _loader()
    a.set_epoch(3), b.set_epoch(3)
    batches_a, batches_b = list(a), list(b)
    assert len(batches_a) == 3  # 50 // 16 with drop_last for training
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b))
    b.set_epoch(4)
    assert not torch.equal(next(iter(b))[0], batches_a[0][0])


def test_eval_loader_keeps_order_and_every_image():
    ld = _loader(train=False)
    ys = torch.cat([y for _, y in ld])
    assert torch.equal(ys, torch.arange(50) % 10)
    x0 = next(iter(ld))[0]
    assert torch.allclose(x0, (ld.x[:16].float() / 255 - 0.5) / 0.25)


def test_loader_resizes_and_uses_channels_last():
    ld = _loader(image_size=64, channels_last=True, max_steps=2)
    batches = list(ld)
    assert len(batches) == 2
    assert batches[0][0].shape == (16, 3, 64, 64)
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_validation_split_is_seeded_and_disjoint():
    cfg = DataConfig(dataset="synthetic", val_fraction=0.25, train_limit=100)
    s = prepare(cfg, seed=0)
    assert (len(s.val_y), len(s.train_y)) == (64, 100)
    flat = lambda t: {bytes(i.numpy()) for i in t}  # noqa: E731
    assert not flat(s.val_x) & flat(s.train_x)
    assert torch.equal(prepare(cfg, seed=0).val_x, s.val_x)
    assert not torch.equal(prepare(cfg, seed=1).val_x, s.val_x)
    # a split that holds out every training image: one line, not a division by zero in the schedule
    few = DataConfig(dataset="synthetic", synthetic={"train_size": 8, "test_size": 4}, val_fraction=0.99)
    with pytest.raises(DataError, match=r"data.val_fraction 0.99 holds out 8 of the 8 training images, leaving none"):
        prepare(few, seed=0)


def _write_imagefolder_tar(path, classes=("cat", "dog"), per_class=3, reverse=False):
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for ci, c in (reversed if reverse else list)(list(enumerate(classes))):
                for i in (reversed if reverse else list)(range(per_class)):
                    im = Image.fromarray(np.full((32, 32, 3), 20 * ci + i, dtype=np.uint8))
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    info = tarfile.TarInfo(f"copy/{split}/{c}/{i:04d}.png")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)


def test_imagefolder_archive_is_decoded_once_and_cached(tmp_path):
    archive = tmp_path / "two.tar.gz"
    _write_imagefolder_tar(archive)
    cfg = DataConfig(dataset="cifar10", path=str(archive), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="has 2 classes but data.dataset=cifar10 needs 10"):
        load_splits(cfg)
    _write_imagefolder_tar(archive, classes=tuple(f"c{i}" for i in range(10)), per_class=2)
    s = load_splits(cfg)
    assert s.train_x.shape == (20, 3, 32, 32) and s.train_x.dtype == torch.uint8
    assert s.classes == [f"c{i}" for i in range(10)]
    assert s.train_y.tolist() == [i // 2 for i in range(20)]
    assert int(s.train_x[3, 0, 0, 0]) == 20 * 1 + 1  # class c1, image 0001 (PNG is lossless)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    again = load_splits(cfg)
    assert torch.equal(again.train_x, s.train_x)


# Wrong versions (the data audit): an archive read in member order, so that one seed draws other subsets,
# validation splits and batches from it than from the same images in a folder; a folder's decoded copy
# cached under the folder's own size and time, so that an image edited or added inside it is never seen.
def test_an_archive_and_a_folder_of_the_same_images_give_the_same_data(tmp_path):
    classes = tuple(f"c{i}" for i in range(10))
    _write_imagefolder_tar(tmp_path / "sorted.tar.gz", classes=classes, per_class=2)
    _write_imagefolder_tar(tmp_path / "reversed.tar.gz", classes=classes, per_class=2, reverse=True)
    with tarfile.open(tmp_path / "sorted.tar.gz") as tar:
        tar.extractall(tmp_path / "folder", filter="data")
    loaded = [load_splits(DataConfig(dataset="cifar10", path=str(tmp_path / p), cache_dir=str(tmp_path / "cache")))
              for p in ("sorted.tar.gz", "reversed.tar.gz", "folder/copy")]
    for other in loaded[1:]:
        assert torch.equal(other.train_x, loaded[0].train_x) and torch.equal(other.train_y, loaded[0].train_y)
        assert torch.equal(other.test_x, loaded[0].test_x)


def test_a_folders_cache_sees_an_image_edited_or_added_inside_it(tmp_path):
    classes = tuple(f"c{i}" for i in range(10))
    _write_imagefolder_tar(tmp_path / "a.tar.gz", classes=classes, per_class=2)
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(tmp_path / "folder", filter="data")
    cfg = DataConfig(dataset="cifar10", path=str(tmp_path / "folder/copy"), cache_dir=str(tmp_path / "cache"))
    before = load_splits(cfg)
    image = tmp_path / "folder/copy/train/c0/0000.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(image)
    edited = load_splits(cfg)
    assert int(edited.train_x[0, 0, 0, 0]) == 200 != int(before.train_x[0, 0, 0, 0])
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(tmp_path / "folder/copy/train/c0/0009.png")
    assert len(load_splits(cfg).train_y) == len(before.train_y) + 1


def _fake_cifar100(root):
    """torchvision's CIFAR-100 files (python pickles), with 2 images per class."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 100)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"k{i}" for i in range(100)]}, f)


def test_cifar100_through_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import calculate_md5

    _fake_cifar100(tmp_path)
    md5 = lambda name: calculate_md5(str(tmp_path / "cifar-100-python" / name))  # noqa: E731
    # torchvision checks its files' md5 sums; point it at our fakes'.
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5("train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5("test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5("meta")})
    s = prepare(DataConfig(dataset="cifar100", path=str(tmp_path), val_fraction=0.1), seed=0)
    assert s.num_classes == 100
    assert (s.train_x.shape, s.val_x.shape, s.test_x.shape) == ((180, 3, 32, 32), (20, 3, 32, 32), (100, 3, 32, 32))


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESCOMP_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"no cifar100 found; looked in: .*nowhere.*data.download=auto"):
        load_splits(DataConfig(dataset="cifar100", download=False))
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(dataset="cifar10", path=str(tmp_path / "missing.tar.gz")))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="not a readable tar archive") as e:
        load_splits(DataConfig(dataset="cifar10", path=str(tmp_path / "junk.tar.gz"), cache_dir=str(tmp_path)))
    msg = str(e.value)  # one line, not every method tarfile tried, and its brackets balanced
    assert "\n" not in msg and "method gz" not in msg and msg.count("(") == msg.count(")"), msg


# -- data.download: auto ------------------------------------------------------------------------
# Wrong versions these tests must catch: a download attempted although a local copy exists; a failed
# download that leaves a folder or archive behind; a failure message that does not say where rescomp
# looked or why the download failed; a finished download that the next run fetches again.


@pytest.fixture
def cifar100_server(tmp_path, monkeypatch):
    """Fake CIFAR-100 files, archived as torchvision expects, served over HTTP on loopback."""
    import functools
    import http.server
    import tarfile
    import threading

    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import calculate_md5

    src = tmp_path / "src"
    _fake_cifar100(src)
    md5 = lambda name: calculate_md5(str(src / "cifar-100-python" / name))  # noqa: E731
    serve = tmp_path / "www"
    serve.mkdir()
    with tarfile.open(serve / "c100.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(CIFAR100, "url", f"http://127.0.0.1:{server.server_address[1]}/c100.tar.gz")
    monkeypatch.setattr(CIFAR100, "tgz_md5", calculate_md5(str(serve / "c100.tar.gz")))
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5("train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5("test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5("meta")})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESCOMP_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    yield server
    server.shutdown()


def test_auto_downloads_once_when_no_local_copy(tmp_path, cifar100_server, capsys):
    cfg = DataConfig(dataset="cifar100", cache_dir=str(tmp_path / "cache"))
    s = load_splits(cfg)
    assert (s.train_x.shape, s.test_x.shape) == ((200, 3, 32, 32), (100, 3, 32, 32))
    assert (tmp_path / "cache" / "datasets" / "cifar-100-python" / "train").is_file()
    assert s.source == "cifar100: torchvision's official files (md5 verified)"  # no path of this machine
    assert "downloading cifar100" in capsys.readouterr().err
    assert list((tmp_path / "tmp").iterdir()) == []  # the archive and the staging folder are gone
    cifar100_server.shutdown()  # the next run must find the download, not fetch it again
    again = load_splits(cfg)
    assert torch.equal(again.train_x, s.train_x)


def test_auto_prefers_a_local_copy_and_false_never_downloads(tmp_path, cifar100_server, monkeypatch):
    from torchvision.datasets import CIFAR100

    CIFAR100.url = "http://127.0.0.1:9/never.tar.gz"  # monkeypatched: a fetch here would fail
    _fake_cifar100(tmp_path / "nowhere")
    assert load_splits(DataConfig(dataset="cifar100", cache_dir=str(tmp_path / "c"))).num_classes == 100
    assert not (tmp_path / "c" / "datasets").exists()
    monkeypatch.setenv("RESCOMP_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no cifar100 found; looked in: .*empty.*data.download=auto"):
        load_splits(DataConfig(dataset="cifar100", download=False, cache_dir=str(tmp_path / "c")))


def test_failed_download_is_one_line_and_leaves_nothing(tmp_path, cifar100_server, monkeypatch):
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:9/c100.tar.gz")  # nothing listens on port 9
    cfg = DataConfig(dataset="cifar100", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        load_splits(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(r"no local copy of cifar100 was found \(looked in: .*nowhere.*datasets\) and downloading it "
                     r"through torchvision failed: .*(refused|URLError).*data\.path", msg), msg
    assert not (tmp_path / "cache").exists()  # not even the download folder
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cli_missing_data_exits_2_with_one_line(workdir, tiny, monkeypatch):
    from typer.testing import CliRunner

    from rescomp.cli import app
    from conftest import write_config

    monkeypatch.setenv("RESCOMP_DATA", str(workdir / "nowhere"))
    tiny["data"] = {"dataset": "cifar100", "download": False, "cache_dir": str(workdir / "c")}
    r = CliRunner().invoke(app, ["train", str(write_config(workdir, tiny))])
    assert r.exit_code == 2 and "no cifar100 found" in r.output and "Traceback" not in r.output
    assert not (workdir / "runs").exists()
    # a torchvision root named that does not hold the dataset, with downloads off: the dry run refuses it too
    (workdir / "empty").mkdir()
    tiny["data"].update(path=str(workdir / "empty"), source="torchvision")
    for dry in ([], ["--dry-run"]):
        r = CliRunner().invoke(app, ["train", str(write_config(workdir, tiny)), *dry])
        assert r.exit_code == 2 and "cifar100 not found under" in r.output and "data.download=auto" in r.output, dry
    assert not (workdir / "runs").exists()
    # a stage given a network trains nothing first, and its dry run still reads where the data is
    synthetic = {**tiny, "data": {"dataset": "synthetic", "synthetic": {"train_size": 32, "test_size": 16}},
                 "train": {**tiny["train"], "epochs": 1}, "measure": {"latency": False}, "name": "given"}
    assert CliRunner().invoke(app, ["train", str(write_config(workdir, synthetic, "given.yaml"))]).exit_code == 0
    tiny["data"].update(dataset="cifar10")
    for dry in ([], ["--dry-run"]):
        r = CliRunner().invoke(app, ["quantize", str(write_config(workdir, tiny)), "--set",
                                     "quantize.checkpoint=runs/given/model.pt", *dry])
        assert r.exit_code == 2 and "cifar10 not found under" in r.output, (dry, r.output)
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["given"]


# Wrong version: an image file that is not one (text under a .png name, a file cut short) ending in PIL's
# traceback instead of one line naming the file.
def test_an_unreadable_image_in_a_folder_is_one_line_naming_it(tmp_path):
    classes = tuple(f"c{i}" for i in range(10))
    _write_imagefolder_tar(tmp_path / "a.tar.gz", classes=classes, per_class=2)
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(tmp_path / "folder", filter="data")
    bad = tmp_path / "folder/copy/train/c3/0001.png"
    for content in (b"not an image", bad.read_bytes()[:40]):
        bad.write_bytes(content)
        cfg = DataConfig(dataset="cifar10", path=str(tmp_path / "folder/copy"), cache_dir=str(tmp_path / "cache"))
        with pytest.raises(DataError, match=r"train/c3/0001.png is not a readable image .*; replace or delete it"):
            load_splits(cfg)
