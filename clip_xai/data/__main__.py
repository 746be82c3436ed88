"""``python -m clip_xai.data {prepare,verify} NAME [--root DIR]`` (also installed as ``clip-xai-data``).

prepare: print the dataset's source and terms, download (resumable, checksum pinned where one is
published) or take the user's archives, unpack, arrange into the loader's layout, then verify.
verify: offline counts and decoding checks against the official numbers; exit status 1 on problems.
The root defaults to ``dataset_roots.<name>`` of conf/config.yaml, i.e. ``$CLIP_XAI_DATA/<name>``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from clip_xai.data.prepare import SOURCES, Options, default_root, prepare
from clip_xai.data.verify import verify
from clip_xai.errors import ClipXaiError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clip_xai.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    names = sorted(SOURCES)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", choices=names)
    common.add_argument("--root", type=Path, default=None,
                        help="dataset folder (default: dataset_roots.<name> in conf/config.yaml = $CLIP_XAI_DATA/<name>)")
    common.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding images")
    v = sub.add_parser("verify", parents=[common], help="check a dataset root offline")
    v.add_argument("--quick", action="store_true", help="count files only, do not decode images")
    pr = sub.add_parser("prepare", parents=[common], help="download/unpack/arrange a dataset, then verify it")
    pr.add_argument("--archive", type=Path, action="append", default=[],
                    help="a local archive instead of downloading it (repeat per file; imagenet: ILSVRC2012_img_val.tar)")
    pr.add_argument("--url", help="download URL for a single-file dataset (rival10: the link from its project page)")
    pr.add_argument("--mirror", help="URL prefix to fetch every file from (file names appended)")
    pr.add_argument("--limit", type=int, help="cc: only the first N URLs of the validation list")
    pr.add_argument("--processes", type=int, default=4, help="cc: img2dataset processes")
    pr.add_argument("--threads", type=int, default=32, help="cc: img2dataset threads per process")
    pr.add_argument("--devkit", type=Path, help="imagenet: ILSVRC2012_devkit_t12.tar.gz (labels and class names)")
    pr.add_argument("--loc-csv", type=Path, help="imagenet: Kaggle's LOC_val_solution.csv (labels)")
    pr.add_argument("--synsets", type=Path, help="imagenet: LOC_synset_mapping.txt to place beside val/")
    pr.add_argument("--keep-archives", action="store_true", help="keep downloaded archives after unpacking")
    pr.add_argument("--force", action="store_true", help="replace an earlier, incomplete result in the root")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 verify found problems, 2 bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prepare" and args.limit is not None and args.limit < 1:
            raise ClipXaiError(f"--limit must be >= 1, got {args.limit}", "drop --limit to fetch every URL")
        if args.command == "verify":
            root = args.root if args.root is not None else default_root(args.name)
            report = verify(args.name, root, deep=not args.quick, workers=args.workers)
        else:
            opts = Options(archives=args.archive, url=args.url, mirror=args.mirror, limit=args.limit,
                           processes=args.processes, threads=args.threads, devkit=args.devkit, loc_csv=args.loc_csv,
                           synsets=args.synsets, keep_archives=args.keep_archives, force=args.force,
                           progress=not args.no_progress, workers=args.workers)
            report = prepare(args.name, args.root, opts)
    except ClipXaiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.render())
    return 0 if report.ok else 1


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
