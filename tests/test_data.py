"""Dataset loaders on small on-disk fixtures of every supported layout (built in tmp_path)."""
from __future__ import annotations

import base64
import io
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_xai.data import (
    ConceptualCaptionsDataset,
    Flickr8kDataset,
    ImageNetDataset,
    Rival10Dataset,
    SampleDataset,
    collate,
    make_loader,
)
from clip_xai.errors import ClipXaiError
from clip_xai.types import Batch

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_PHOTOS = SHARED / "data" / "imagenet_rival10_classes"


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """Write a small random RGB image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None)
    return path


def write_garbage(path: Path) -> Path:
    """Write bytes that no image decoder accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image" * 10)
    return path


def check_item(item: dict, size: int = 224) -> None:
    """A good item: float32 (3,S,S) pixels in [0,1]."""
    assert item["ok"] is True
    px = item["pixels"]
    assert px.shape == (3, size, size) and px.dtype == torch.float32
    assert 0.0 <= px.min().item() and px.max().item() <= 1.0


# ---------------------------------------------------------------- sample set
def test_sample_dataset_offline():
    ds = SampleDataset()
    assert ds.sample_ids[:2] == ["astronaut", "chelsea"] and len(ds) >= 8
    item = ds[1]
    check_item(item)
    assert item["caption"] == "a photo of a cat" and item["label"] == -1 and item["object_mask"] is None
    horse = ds[ds.sample_ids.index("horse")]["pixels"]
    assert torch.equal(horse[0], horse[1])  # binary silhouette converted to RGB


def test_preprocessing_matches_open_clip():
    open_clip_transform = pytest.importorskip("open_clip.transform")
    from clip_xai.data.base import load_rgb

    t = open_clip_transform.image_transform(224, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))
    ds = SampleDataset(names=["chelsea", "page"])
    for i, rec in enumerate(ds.records):
        assert torch.allclose(ds[i]["pixels"], t(load_rgb(rec.image)), atol=1e-6)


def test_seeded_subset_and_limit():
    ids = lambda **kw: SampleDataset(**kw).sample_ids  # noqa: E731
    full = ids()
    a, b, c = ids(limit=4, subset_seed=1), ids(limit=4, subset_seed=1), ids(limit=4, subset_seed=2)
    assert len(a) == 4 and a == b and a != c
    assert a == sorted(a, key=full.index)  # original order kept
    assert ids(limit=100) == full and ids(limit=None) == full
    with pytest.raises(ClipXaiError):
        SampleDataset(limit=0)


# ---------------------------------------------------------------- RIVAL10
def _png_b64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def rival10_root(tmp_path: Path) -> Path:
    folder = tmp_path / "RIVAL10" / "test" / "ordinary"
    stems = ["n02123394_100", "n03796401_200", "n01531178_300"]  # cat, truck, bird
    for i, stem in enumerate(stems):
        write_image(folder / f"{stem}.JPEG", size=(80, 60), seed=i)
        np.save(folder / f"{stem}_attr_labels.npy", np.zeros((2, 18), dtype=np.int64))
    left = np.zeros((60, 80), bool)
    left[:, :40] = True
    with (folder / f"{stems[0]}_attr_dict.pkl").open("wb") as f:
        pickle.dump({"entire-object": _png_b64(left), "ears": _png_b64(~left)}, f)
    Image.fromarray(left.astype(np.uint8) * 255).save(folder / f"{stems[1]}_merged_mask.JPEG")
    write_image(tmp_path / "RIVAL10" / "test" / "ordinary" / "n99999999_1.JPEG")  # not a RIVAL10 wnid
    return tmp_path


def test_rival10_labels_captions_masks(rival10_root: Path):
    ds = Rival10Dataset(rival10_root)  # parent of RIVAL10/
    assert ds.sample_ids == ["n01531178_300", "n02123394_100", "n03796401_200"]
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        check_item(it)
    assert [it["label"] for it in items] == [9, 4, 0]
    assert [it["caption"] for it in items] == ["a photo of a bird", "a photo of a cat", "a photo of a truck"]
    assert items[0]["object_mask"] is None
    for it in items[1:]:  # pickle entire-object, then merged-mask fallback: left half of the image
        m = it["object_mask"]
        assert m.shape == (224, 224) and m.dtype == torch.bool
        assert m[:, :100].all() and not m[:, 125:].any()
    batch, n_skipped, _ = collate(items[1:])
    assert batch.object_masks is not None and batch.object_masks.shape == (2, 224, 224) and n_skipped == 0
    assert collate(items)[0].object_masks is None  # one item without a mask
    ds2 = Rival10Dataset(rival10_root / "RIVAL10", prompt="an image of {}", limit=2, subset_seed=3)
    assert len(ds2) == 2 and ds2[0]["caption"].startswith("an image of ")


def test_rival10_missing_root(tmp_path: Path):
    with pytest.raises(ClipXaiError, match="nowhere") as err:
        Rival10Dataset(tmp_path / "nowhere")
    assert "dataset=sample" in str(err.value)


# ---------------------------------------------------------------- ImageNet
@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    if not REAL_PHOTOS.is_dir():
        pytest.skip(f"{REAL_PHOTOS} not available")
    for photo in sorted(REAL_PHOTOS.glob("*.JPEG")):
        wnid = photo.name.split("_")[0]
        dest = tmp_path / "val" / wnid
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, dest / f"ILSVRC2012_val_{wnid}.JPEG")
    return tmp_path


def test_imagenet_folder_wnid_fallback(imagenet_root: Path, caplog):
    with caplog.at_level(logging.WARNING):
        ds = ImageNetDataset(imagenet_root)
    assert "wnid" in caplog.text
    assert len(ds) == 20 and ds.wnids == sorted(ds.wnids)
    item = ds[0]
    check_item(item)
    assert item["label"] == 0 and item["caption"] == "a photo of a n01531178"
    assert ds[19]["label"] == 19
    same = ImageNetDataset(imagenet_root / "val", limit=5, subset_seed=7)  # root = the val dir itself
    assert same.sample_ids == ImageNetDataset(imagenet_root, limit=5, subset_seed=7).sample_ids


def test_imagenet_synset_mapping_names(imagenet_root: Path):
    lines = [f"{p.name.split('_')[0]} {' '.join(p.stem.split('_')[1:])}, synonym" for p in REAL_PHOTOS.glob("*.JPEG")]
    (imagenet_root / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    ds = ImageNetDataset(imagenet_root, limit=3)
    assert ds.classnames[0] == "goldfinch" and ds.classnames[1] == "house finch"


def test_imagenet_clip_names(tmp_path: Path):
    pytest.importorskip("open_clip")
    wnids = [f"n{i:08d}" for i in range(1000)]
    for w in wnids:
        (tmp_path / "val" / w).mkdir(parents=True)
    write_image(tmp_path / "val" / wnids[1] / "a.JPEG")
    ds = ImageNetDataset(tmp_path)
    assert ds.classnames[0] == "tench" and ds[0]["label"] == 1 and ds[0]["caption"] == "a photo of a goldfish"
    # Only some folders, but the standard 1000-line mapping file: CLIP names through its order.
    sub = tmp_path / "sub"
    write_image(sub / "val" / wnids[11] / "b.JPEG")
    (sub / "LOC_synset_mapping.txt").write_text("".join(f"{w} name{i}, x\n" for i, w in enumerate(wnids)))
    assert ImageNetDataset(sub)[0]["caption"] == "a photo of a goldfinch"


def test_imagenet_missing_root(tmp_path: Path):
    with pytest.raises(ClipXaiError, match="missing_imagenet"):
        ImageNetDataset(tmp_path / "missing_imagenet")


# ---------------------------------------------------------------- Conceptual Captions
def test_cc_img2dataset_folder(tmp_path: Path):
    for i, shard in enumerate(["00000", "00000", "00001"]):
        key = f"{i:09d}"
        write_image(tmp_path / shard / f"{key}.jpg", seed=i)
        (tmp_path / shard / f"{key}.txt").write_text(f"caption {i}\n")
        (tmp_path / shard / f"{key}.json").write_text("{}")
    write_image(tmp_path / "00001" / "000000009.jpg")  # no caption file: ignored
    ds = ConceptualCaptionsDataset(tmp_path)
    assert ds.sample_ids == ["000000000", "000000001", "000000002"]
    check_item(ds[2])
    assert ds[2]["caption"] == "caption 2" and ds[2]["label"] == -1


def test_cc_csv_and_tsv(tmp_path: Path):
    write_image(tmp_path / "imgs" / "a.jpg")
    write_image(tmp_path / "imgs" / "b.png", seed=1)
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('image_path,caption\nimgs/a.jpg,"a dog, running"\nimgs/b.png,a cat\nimgs/gone.jpg,lost\n')
    ds = ConceptualCaptionsDataset(str(csv_file))
    assert [ds[i]["caption"] for i in range(2)] == ["a dog, running", "a cat"]
    batch, n_skipped, skipped = collate([ds[i] for i in range(3)])  # missing image skipped, counted
    assert len(batch) == 2 and n_skipped == 1 and skipped == ["imgs/gone.jpg"]
    tsv_file = tmp_path / "pairs.tsv"
    tsv_file.write_text(f"{tmp_path / 'imgs' / 'a.jpg'}\ta photo\n")  # no header, absolute path
    assert ConceptualCaptionsDataset(tsv_file)[0]["caption"] == "a photo"
    official = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    official.write_text("a caption\thttp://example.com/x.jpg\n")
    with pytest.raises(ClipXaiError, match="img2dataset"):
        ConceptualCaptionsDataset(official)


def test_cc_missing_and_empty(tmp_path: Path):
    with pytest.raises(ClipXaiError, match="no_such.tsv"):
        ConceptualCaptionsDataset(tmp_path / "no_such.tsv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipXaiError, match="empty"):
        ConceptualCaptionsDataset(tmp_path / "empty")


# ---------------------------------------------------------------- Flickr8k
@pytest.fixture
def flickr_root(tmp_path: Path) -> Path:
    names = [f"{1000 + i}_abc.jpg" for i in range(4)]
    for i, n in enumerate(names):
        write_image(tmp_path / "Flicker8k_Dataset" / n, seed=i)
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text(
        "".join(f"{n}#{k}\tcaption {k} of {n}\n" for n in names for k in range(5))
    )
    (text / "Flickr_8k.testImages.txt").write_text(f"{names[2]}\n{names[0]}\n")
    (text / "Flickr_8k.trainImages.txt").write_text(f"{names[1]}\n{names[3]}\n")
    return tmp_path


def test_flickr8k_splits_and_captions(flickr_root: Path):
    ds = Flickr8kDataset(flickr_root)
    assert ds.sample_ids == ["1002_abc", "1000_abc"]
    check_item(ds[0])
    assert ds[0]["caption"] == "caption 0 of 1002_abc.jpg"
    assert Flickr8kDataset(flickr_root, split="train", caption_index=3)[1]["caption"] == "caption 3 of 1003_abc.jpg"
    assert len(Flickr8kDataset(flickr_root, split="all")) == 4
    with pytest.raises(ClipXaiError):
        Flickr8kDataset(flickr_root, split="validation")


def test_flickr8k_missing_token_file(flickr_root: Path):
    (flickr_root / "Flickr8k_text" / "Flickr8k.token.txt").unlink()
    with pytest.raises(ClipXaiError, match="Flickr8k.token.txt"):
        Flickr8kDataset(flickr_root)


# ---------------------------------------------------------------- bad images, collate, loader
def test_corrupt_image_skip_and_error(flickr_root: Path, caplog):
    write_garbage(flickr_root / "Flicker8k_Dataset" / "1000_abc.jpg")
    ds = Flickr8kDataset(flickr_root, on_bad_image="skip")
    with caplog.at_level(logging.WARNING):
        bad = ds[1]
    assert bad["ok"] is False and "1000_abc.jpg" in caplog.text
    batch, n_skipped, skipped = next(iter(make_loader(ds, batch_size=2, num_workers=0, pin_memory=False)))
    assert isinstance(batch, Batch) and batch.sample_ids == ["1002_abc"] and n_skipped == 1 and skipped == ["1000_abc"]
    strict = Flickr8kDataset(flickr_root, on_bad_image="error")
    with pytest.raises(ClipXaiError, match="1000_abc.jpg") as err:
        strict[1]
    assert "on_bad_image" in err.value.fix
    with pytest.raises(ClipXaiError):
        Flickr8kDataset(flickr_root, on_bad_image="ignore")


def test_collate_and_loader_order():
    ds = SampleDataset(names=["astronaut", "chelsea", "coffee"], image_size=32)
    batches = list(make_loader(ds, batch_size=2, num_workers=0, pin_memory=False))
    assert [len(b) for b, _, _ in batches] == [2, 1]
    batch = batches[0][0]
    assert batch.sample_ids == ["astronaut", "chelsea"] and batch.captions[1] == "a photo of a cat"
    assert batch.pixels.shape == (2, 3, 32, 32) and batch.labels.dtype == torch.long
    assert batch.labels.tolist() == [-1, -1] and batch.object_masks is None
    empty, n_skipped, _ = collate([{**ds[0], "ok": False}])
    assert len(empty) == 0 and empty.pixels.shape == (0, 3, 32, 32) and n_skipped == 1
