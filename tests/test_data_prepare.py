"""`python -m clip_xai.data prepare/verify`, offline: fixture archives of real photos served by a
local HTTP server (127.0.0.1) inside the test, resume after an interrupted download, checksum
mismatch, and the loaders reading what prepare built."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_xai.data import prepare as prep
from clip_xai.data import verify as ver
from clip_xai.data.__main__ import main
from clip_xai.data.download import Remote
from clip_xai.errors import ClipXaiError

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet_rival10_classes"


def real_jpegs(n: int) -> list[tuple[str, bytes]]:
    """``n`` real photos as (wnid, JPEG bytes): the shared ImageNet photos, else scikit-image's."""
    if SHARED_IMAGES.is_dir():
        paths = sorted(SHARED_IMAGES.glob("*.JPEG"))[:n]
        return [(p.name.split("_")[0], p.read_bytes()) for p in paths]
    import skimage.data

    out = []
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera"][:n]):
        arr = getattr(skimage.data, name if name != "motorcycle" else "stereo_motorcycle")()
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)
        buf = io.BytesIO()
        Image.fromarray(arr).convert("RGB").save(buf, "JPEG")
        out.append((f"n0{1000000 + i:07d}", buf.getvalue()))
    return out


class Server:
    """Threaded HTTP server on 127.0.0.1 serving in-memory files with Range support.

    ``cut[path] = n`` makes the next response for ``path`` announce the full length but close the
    connection after ``n`` bytes (an interrupted transfer). Requests are recorded as (path, Range).
    """

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.requests, self.ignore_range = dict(files), {}, [], False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                outer.requests.append((path, self.headers.get("Range")))
                data = outer.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = None if outer.ignore_range else self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = outer.cut.pop(path, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(entries: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def _with_hashes(monkeypatch, name: str, hashes: dict[str, str | None]) -> None:
    """Pin the fixture archives' own checksums in place of the official ones (same machinery)."""
    src = prep.SOURCES[name]
    remotes = tuple(dataclasses.replace(r, known_hash=hashes.get(r.fname, r.known_hash)) for r in src.remotes)
    monkeypatch.setitem(prep.SOURCES, name, dataclasses.replace(src, remotes=remotes))


# -- Flickr8k: two zips over HTTP ----------------------------------------------------------------
@pytest.fixture()
def flickr8k_archives():
    photos = real_jpegs(6)
    names = [f"{1000 + i}_abc.jpg" for i in range(len(photos))]
    images = {f"Flicker8k_Dataset/{n}": data for n, (_, data) in zip(names, photos)}
    images["__MACOSX/Flicker8k_Dataset/._x.jpg"] = b"mac metadata"
    tokens = "".join(f"{n}#{k}\ta caption number {k} of {n}\n" for n in names for k in range(5))
    text = {"Flickr8k.token.txt": tokens.encode(), "Flickr_8k.trainImages.txt": "\n".join(names[:4]).encode(),
            "Flickr_8k.devImages.txt": names[4].encode(), "Flickr_8k.testImages.txt": names[5].encode()}
    return {"Flickr8k_Dataset.zip": _zip(images), "Flickr8k_text.zip": _zip(text)}, names


def _flickr_official(monkeypatch, n: int) -> None:
    monkeypatch.setitem(ver.OFFICIAL, "flickr8k",
                        {"images": n, "captions": 5 * n, "train": n - 2, "dev": 1, "test": 1})


def test_flickr8k_prepare_over_http_then_loader_reads_it(tmp_path, monkeypatch, flickr8k_archives, capsys):
    archives, names = flickr8k_archives
    _with_hashes(monkeypatch, "flickr8k", {k: _md5(v) for k, v in archives.items()})
    root = tmp_path / "flickr8k"
    with Server({f"/{k}": v for k, v in archives.items()}) as srv:
        # the official counts differ from the fixture's: verify reports MISMATCH and exits 1
        assert main(["prepare", "flickr8k", "--root", str(root), "--mirror", srv.url, "--no-progress"]) == 1
        out = capsys.readouterr().out
        assert "terms:" in out and "Hodosh" in out and "MISMATCH" in out and "8,091" in out
        _flickr_official(monkeypatch, len(names))
        assert main(["verify", "flickr8k", "--root", str(root)]) == 0
    assert sorted(p.name for p in (root / "Flicker8k_Dataset").iterdir()) == sorted(names)
    assert (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file()
    assert not (root / ".downloads").exists() and not list(root.glob(".staging-*"))  # archives removed
    from clip_xai.data import Flickr8kDataset

    ds = Flickr8kDataset(root, split="train", image_size=32)
    assert len(ds) == 4 and ds[0]["ok"] and ds[0]["caption"].startswith("a caption number 0")


def test_download_resumes_after_interruption(tmp_path, monkeypatch, flickr8k_archives, capsys):
    archives, names = flickr8k_archives
    _with_hashes(monkeypatch, "flickr8k", {k: _md5(v) for k, v in archives.items()})
    _flickr_official(monkeypatch, len(names))
    root = tmp_path / "flickr8k"
    big = archives["Flickr8k_Dataset.zip"]
    cut = len(big) // 2  # > one 64 KiB network chunk
    with Server({f"/{k}": v for k, v in archives.items()}) as srv:
        srv.cut["/Flickr8k_Dataset.zip"] = cut
        assert main(["prepare", "flickr8k", "--root", str(root), "--mirror", srv.url, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "run the same command again" in err and "resumes" in err
        part = root / ".downloads" / "Flickr8k_Dataset.zip.part"
        have = part.stat().st_size
        assert 0 < have <= cut  # the partial file is kept (whole network chunks) ...
        assert not (root / "Flicker8k_Dataset").exists()  # ... and nothing half-built
        assert main(["prepare", "flickr8k", "--root", str(root), "--mirror", srv.url, "--no-progress"]) == 0
    assert ("/Flickr8k_Dataset.zip", f"bytes={have}-") in srv.requests  # asked only for the rest
    assert len(list((root / "Flicker8k_Dataset").iterdir())) == len(names)


def test_server_without_range_support_restarts_the_download(tmp_path, monkeypatch, flickr8k_archives):
    archives, names = flickr8k_archives
    _with_hashes(monkeypatch, "flickr8k", {k: _md5(v) for k, v in archives.items()})
    _flickr_official(monkeypatch, len(names))
    root = tmp_path / "flickr8k"
    part = root / ".downloads" / "Flickr8k_Dataset.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes that a resume would wrongly keep")
    with Server({f"/{k}": v for k, v in archives.items()}) as srv:
        srv.ignore_range = True  # answers 200 with the whole file
        assert main(["prepare", "flickr8k", "--root", str(root), "--mirror", srv.url, "--no-progress"]) == 0
    assert len(list((root / "Flicker8k_Dataset").iterdir())) == len(names)


@pytest.mark.slow
def test_cli_subprocess_verify_exit_codes(tmp_path):
    """The real `python -m clip_xai.data` entry point: table on stdout, 1 on problems, 2 on a missing root."""
    from tests.helpers import run_module

    root = tmp_path / "rival10"
    data, _ = _rival10_zip(2)
    archive = tmp_path / "r.zip"
    archive.write_bytes(data)
    from clip_xai.data.download import unpack

    unpack(archive, root)
    run = lambda *a: run_module("clip_xai.data", list(a), timeout=300)  # noqa: E731
    ok = run("verify", "rival10", "--root", str(root))
    assert ok.returncode == 0 and "result: OK" in ok.stdout
    (next((root / "RIVAL10" / "test" / "ordinary").glob("*_merged_mask.JPEG"))).unlink()
    bad = run("verify", "rival10", "--root", str(root), "--quick")
    assert bad.returncode == 1 and "without merged_mask.JPEG" in bad.stdout
    gone = run("verify", "rival10", "--root", str(tmp_path / "nowhere"))
    assert gone.returncode == 2 and "prepare rival10" in gone.stderr


def test_bad_checksum_leaves_nothing_behind(tmp_path, monkeypatch, flickr8k_archives, capsys):
    archives, _ = flickr8k_archives
    _with_hashes(monkeypatch, "flickr8k", {"Flickr8k_Dataset.zip": "md5:" + "0" * 32,
                                           "Flickr8k_text.zip": _md5(archives["Flickr8k_text.zip"])})
    root = tmp_path / "flickr8k"
    with Server({f"/{k}": v for k, v in archives.items()}) as srv:
        assert main(["prepare", "flickr8k", "--root", str(root), "--mirror", srv.url, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and err.count("error:") == 1
    assert not root.exists()  # no dataset, no staging folder, no partial download


def test_unpack_refuses_path_traversal(tmp_path):
    from clip_xai.data.download import unpack

    bad = tmp_path / "bad.zip"
    bad.write_bytes(_zip({"../evil.txt": b"x"}))
    with pytest.raises(ClipXaiError, match="outside"):
        unpack(bad, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


# -- RIVAL10: the user's zip ----------------------------------------------------------------------
def _rival10_zip(n: int = 4) -> tuple[bytes, list[str]]:
    entries, stems = {}, []
    for i, (wnid, data) in enumerate(real_jpegs(n)):
        wnid = wnid if wnid in ver.RIVAL10_WNIDS else "n02123394"
        stem = f"RIVAL10/{('test', 'train')[i % 2]}/ordinary/{wnid}_{i}"
        w, h = Image.open(io.BytesIO(data)).size
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        png, jpg = io.BytesIO(), io.BytesIO()
        Image.fromarray(mask).save(png, "PNG")
        Image.fromarray(mask).save(jpg, "JPEG")
        entries[stem + ".JPEG"] = data
        entries[stem + "_merged_mask.JPEG"] = jpg.getvalue()
        entries[stem + "_attr_labels.npy"] = _npy(np.zeros((2, 18), np.int64))
        entries[stem + "_attr_dict.pkl"] = pickle.dumps({"entire-object": base64.b64encode(png.getvalue())})
        stems.append(Path(stem).name)
    return _zip(entries), stems


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_rival10_prepare_from_local_zip_and_verify_finds_problems(tmp_path, capsys):
    data, stems = _rival10_zip()
    archive = tmp_path / "rival10_download.zip"
    archive.write_bytes(data)
    root = tmp_path / "rival10"
    assert main(["prepare", "rival10", "--root", str(root), "--archive", str(archive), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "University of Maryland" in out and "not published" in out
    assert f"sha256 of {archive.name}: {hashlib.sha256(data).hexdigest()}" in out
    assert archive.is_file()  # the user's own file is never deleted
    from clip_xai.data import Rival10Dataset

    ds = Rival10Dataset(root, split="test", image_size=32)  # the dataset root (parent of RIVAL10/)
    assert len(ds) == len(stems) // 2 and ds[0]["object_mask"] is not None and ds[0]["object_mask"].any()
    folder = root / "RIVAL10" / "test" / "ordinary"
    (folder / f"{stems[0]}_attr_dict.pkl").unlink()
    (folder / f"{stems[2]}.JPEG").write_bytes(b"not a jpeg")
    rep = ver.verify("rival10", root, workers=1)
    assert not rep.ok
    assert rep.problems["test: images without attr_dict.pkl"] == [f"{stems[0]}.JPEG"]
    assert len(rep.problems["test: unreadable image or companion"]) == 1
    assert stems[2] in rep.problems["test: unreadable image or companion"][0]
    assert main(["verify", "rival10", "--root", str(root)]) == 1


def test_rival10_without_archive_names_the_fix_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "rival10"
    assert main(["prepare", "rival10", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "--archive" in err and "redistribution" in err
    assert not root.exists()


# -- ImageNet: the user's val tar with devkit or Kaggle csv ---------------------------------------
def _imagenet_archives(tmp_path: Path) -> dict[str, Path]:
    import scipy.io

    photos = real_jpegs(6)
    wnids = sorted({"n01440764", "n01443537", "n01484850"})
    labels = [wnids[i % 3] for i in range(len(photos))]
    val = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": data for i, (_, data) in enumerate(photos)}
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(_tar(val))
    # devkit: meta.mat synsets (a parent node with children must be ignored) + ground truth ids
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(1, wnids[0], "tench, Tinca tinca", 0), (2, wnids[1], "goldfish, Carassius auratus", 0),
                        (3, wnids[2], "great white shark", 0), (1001, "n00001740", "entity", 3)], dtype=dtype)
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    truth = "".join(f"{wnids.index(w) + 1}\n" for w in labels)
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(_tar({
        "ILSVRC2012_devkit_t12/data/meta.mat": mat.getvalue(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth.encode()}, "w:gz"))
    csv = "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4 {w} 5 6 7 8\n"
                                                 for i, w in enumerate(labels))
    (tmp_path / "LOC_val_solution.csv").write_text(csv)
    return {"tar": tmp_path / "ILSVRC2012_img_val.tar", "devkit": tmp_path / "ILSVRC2012_devkit_t12.tar.gz",
            "csv": tmp_path / "LOC_val_solution.csv", "labels": labels}


@pytest.mark.parametrize("labels_from", ["devkit", "csv"])
def test_imagenet_prepare_builds_imagefolder(tmp_path, monkeypatch, labels_from):
    a = _imagenet_archives(tmp_path)
    _with_hashes(monkeypatch, "imagenet", {"ILSVRC2012_img_val.tar": _md5(a["tar"].read_bytes()),
                                           "ILSVRC2012_devkit_t12.tar.gz": _md5(a["devkit"].read_bytes())})
    monkeypatch.setitem(ver.OFFICIAL, "imagenet", {"classes": 3, "images": 6, "per_class": 2})
    root = tmp_path / "imagenet"
    flag = ["--devkit", str(a["devkit"])] if labels_from == "devkit" else ["--loc-csv", str(a["csv"])]
    assert main(["prepare", "imagenet", "--root", str(root), "--archive", str(a["tar"]), *flag, "--no-progress"]) == 0
    for i, w in enumerate(a["labels"]):
        assert (root / "val" / w / f"ILSVRC2012_val_{i + 1:08d}.JPEG").is_file()
    from clip_xai.data import ImageNetDataset

    ds = ImageNetDataset(root, image_size=32)
    assert len(ds) == 6
    if labels_from == "devkit":  # class names written from the devkit (leaf synsets only)
        lines = (root / "LOC_synset_mapping.txt").read_text().splitlines()
        assert lines == ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus",
                         "n01484850 great white shark"]
        assert ds.classnames == ["tench", "goldfish", "great white shark"]


def test_imagenet_wrong_labels_or_checksum_write_nothing(tmp_path, monkeypatch, capsys):
    a = _imagenet_archives(tmp_path)
    root = tmp_path / "imagenet"
    # the pinned official md5 does not match the fixture tar: refused before unpacking
    assert main(["prepare", "imagenet", "--root", str(root), "--archive", str(a["tar"]), "--loc-csv", str(a["csv"])]) == 2
    assert "checksum mismatch" in capsys.readouterr().err and not (root / "val").exists()
    _with_hashes(monkeypatch, "imagenet", {"ILSVRC2012_img_val.tar": None})
    a["csv"].write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n")
    assert main(["prepare", "imagenet", "--root", str(root), "--archive", str(a["tar"]), "--loc-csv", str(a["csv"]),
                 "--no-progress"]) == 2
    assert "have no label" in capsys.readouterr().err
    assert not root.exists()


# -- Conceptual Captions: TSV over HTTP, images through img2dataset ------------------------------
def fake_img2dataset(url_list, output_folder, **kwargs):
    """Stands in for img2dataset.download (not installed in the test venv). It writes what
    img2dataset 1.47.0 writes in "files" mode, as observed by running it by hand on a local
    server: <shard>/<key>.jpg/.txt/.json and <shard>.parquet with key/url/caption/status/error_message."""
    import json
    import urllib.error
    import urllib.request

    import pandas as pd

    assert kwargs["output_format"] == "files" and kwargs["input_format"] == "parquet"
    assert kwargs["resize_mode"] == "no" and kwargs["incremental_mode"] == "incremental"
    table, out = pd.read_parquet(url_list), Path(output_folder)
    (out / "00000").mkdir(parents=True, exist_ok=True)
    meta = []
    for i, (caption, url) in enumerate(zip(table["caption"], table["url"])):
        key = f"{i:09d}"
        try:
            data, status, error = urllib.request.urlopen(url, timeout=10).read(), "success", None
        except urllib.error.HTTPError as exc:
            data, status, error = None, "failed_to_download", f"HTTP Error {exc.code}: {exc.reason}"
        if data is not None:
            (out / "00000" / f"{key}.jpg").write_bytes(data)
            (out / "00000" / f"{key}.txt").write_text(caption)
            (out / "00000" / f"{key}.json").write_text(json.dumps({"key": key, "url": url}))
        meta.append({"caption": caption, "url": url, "key": key, "status": status, "error_message": error})
    pd.DataFrame(meta).to_parquet(out / "00000.parquet", index=False)


@pytest.mark.parametrize("downloader", ["stand-in", pytest.param("img2dataset", marks=pytest.mark.slow)])
def test_cc_prepare_counts_failed_urls_and_writes_manifest(tmp_path, monkeypatch, capsys, downloader):
    if downloader == "img2dataset":
        pytest.importorskip("img2dataset")  # the real one, where installed (pip install 'clip_xai[cc]')
    else:
        monkeypatch.setattr(prep, "_img2dataset_download", lambda: fake_img2dataset)
    photos = real_jpegs(4)
    files = {f"/img{i}.jpg": data for i, (_, data) in enumerate(photos)}
    with Server(files) as srv:
        lines = [f"caption of photo {i}\t{srv.url}/img{i}.jpg" for i in range(len(photos))]
        lines.insert(2, f"a dead link\t{srv.url}/gone.jpg")
        tsv = ("\n".join(lines) + "\n").encode()
        srv.files["/Validation_GCC-1.1.0-Validation.tsv"] = tsv
        _with_hashes(monkeypatch, "cc", {"Validation_GCC-1.1.0-Validation.tsv": "sha256:" + hashlib.sha256(tsv).hexdigest()})
        root = tmp_path / "cc"
        code = main(["prepare", "cc", "--root", str(root), "--mirror", srv.url, "--limit", "4", "--no-progress",
                     "--processes", "1", "--threads", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "4 URLs, 3 images, 1 failed" in out and "404" in out
    import pandas as pd

    manifest = pd.read_csv(root / "manifest.csv", keep_default_na=False)
    assert len(manifest) == 4 and (manifest["status"] == "success").sum() == 3  # --limit 4 of 5 lines
    assert manifest.loc[manifest["status"] != "success", "image"].tolist() == [""]
    from clip_xai.data import ConceptualCaptionsDataset

    ds = ConceptualCaptionsDataset(root, image_size=32)
    assert len(ds) == 3 and all(ds[i]["ok"] for i in range(3))
    assert sorted(r.caption for r in ds.records) == [f"caption of photo {i}" for i in range(3)]
    rep = ver.verify("cc", root, workers=1)
    found = {c.what: c.found for c in rep.checks}
    assert found["URLs tried"] == 4 and found["URLs failed"] == 1 and found["downloaded images on disk"] == 3


def test_cc_without_img2dataset_names_the_install_before_any_work(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "img2dataset", None)  # import fails as if not installed
    with Server({}) as srv:
        assert main(["prepare", "cc", "--root", str(tmp_path / "cc"), "--mirror", srv.url]) == 2
    assert "pip install 'clip_xai[cc]'" in capsys.readouterr().err
    assert srv.requests == [] and not (tmp_path / "cc").exists()


# -- roots and start-up checks --------------------------------------------------------------------
def test_roots_come_from_clip_xai_data(tmp_path, monkeypatch):
    from tests.helpers import compose_cfg

    monkeypatch.setenv("CLIP_XAI_DATA", str(tmp_path))
    assert prep.default_root("flickr8k") == tmp_path / "flickr8k"
    for name in ("rival10", "cc", "imagenet", "flickr8k"):
        assert compose_cfg([f"dataset={name}"]).dataset.root == f"{tmp_path}/{name}"
    assert compose_cfg(["dataset=cc", "dataset_roots.cc=/x/cc"]).dataset.root == "/x/cc"


def test_preflight_warns_and_names_verify(tmp_path, caplog, flickr8k_archives):
    archives, names = flickr8k_archives
    root = tmp_path / "flickr8k"
    for name, data in archives.items():
        (tmp_path / name).write_bytes(data)
    from clip_xai.data.download import unpack

    unpack(tmp_path / "Flickr8k_Dataset.zip", root)
    unpack(tmp_path / "Flickr8k_text.zip", root / "Flickr8k_text")
    with caplog.at_level("WARNING", logger="clip_xai.data.verify"):
        rep = ver.preflight("flickr8k", root)
    assert not rep.ok and "python -m clip_xai.data verify flickr8k" in caplog.text
    with pytest.raises(ClipXaiError, match="prepare flickr8k"):
        ver.preflight("flickr8k", tmp_path / "nowhere")
    assert ver.preflight("sample", None) is None


def test_remote_of_unknown_checksum_is_said_so():
    banner = prep.SOURCES["rival10"].banner(Path("/d"))
    assert "not published: verified by counts" in banner
    assert all(r.known_hash for r in prep.SOURCES["flickr8k"].remotes + prep.SOURCES["cc"].remotes)
    assert isinstance(prep.SOURCES["cc"].remotes[0], Remote)


def _found(report, what: str):
    return next(c.found for c in report.checks if c.what == what)


def test_verify_and_loaders_count_the_same_files(tmp_path):
    """Every file format on disk: the verifier counts exactly the files each loader reads (both take
    the extension sets from the loaders' modules), so a .webp in an ImageNet class folder is counted
    by neither, and one in a CC shard by both."""
    from clip_xai.data.conceptual_captions import ConceptualCaptionsDataset
    from clip_xai.data.imagenet import ImageNetDataset

    suffixes = [".JPEG", ".jpg", ".png", ".webp", ".gif", ".txt"]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    for i, suffix in enumerate(suffixes):
        (tmp_path / "in" / "val" / "n01440764").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "val" / "n01440764" / f"img{i}{suffix}").write_bytes(buf.getvalue())
        (tmp_path / "cc" / "00000").mkdir(parents=True, exist_ok=True)
        if suffix != ".txt":
            (tmp_path / "cc" / "00000" / f"{i:09d}{suffix}").write_bytes(buf.getvalue())
            (tmp_path / "cc" / "00000" / f"{i:09d}.txt").write_text("a caption", encoding="utf-8")
    loaded = len(ImageNetDataset(tmp_path / "in", image_size=8))
    assert loaded == 3  # .JPEG, .jpg, .png
    assert _found(ver.verify_imagenet(tmp_path / "in", deep=False), "images") == loaded
    loaded_cc = len(ConceptualCaptionsDataset(tmp_path / "cc", image_size=8))
    assert loaded_cc == 4  # .JPEG, .jpg, .png, .webp
    assert _found(ver.verify_cc(tmp_path / "cc", deep=False), "images with a caption") == loaded_cc
