"""CLI: `python -m clip_xai.report DIR [DIR ...] [--out DIR] [--wandb]`, or
`python -m clip_xai.report --wandb-view REPORT_DIR` to save a report's W&B workspace view later."""
from __future__ import annotations

import argparse
import logging
import sys

from clip_xai.errors import ClipXaiError


def parser() -> argparse.ArgumentParser:
    """The report CLI's argument parser."""
    p = argparse.ArgumentParser(prog="clip-xai-report",
                                description="Gather every clip-xai run under DIRs into one frame and write figures, "
                                            "tables and index.md.")
    p.add_argument("dirs", nargs="*", help="run dirs, sweep dirs, or any dirs above them")
    p.add_argument("--out", default=None, help="output dir (default: <first DIR>/report)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap / plotting seed (default 0)")
    p.add_argument("--grid-eps", type=float, default=None, help="ε of the qualitative grid (default: smallest)")
    p.add_argument("--grid-samples", type=int, default=4, help="samples in the qualitative grid (default 4)")
    p.add_argument("--wandb", action="store_true", help="also log figures and tables to W&B (job_type=report)")
    p.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"],
                   help="W&B mode (default offline)")
    p.add_argument("--wandb-project", default=None, help="W&B project (default clip_xai)")
    p.add_argument("--wandb-entity", default=None, help="W&B entity (default: the logged-in user's)")
    p.add_argument("--wandb-view", default=None, metavar="REPORT_DIR",
                   help="save the W&B workspace view a --wandb report wrote (REPORT_DIR/wandb_view.json) "
                        "to W&B, then exit (needs a login; no DIRs)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the report CLI; returns the exit status (2 with a one-line fix on user errors)."""
    p = parser()
    args = p.parse_args(argv)
    if (args.wandb_view is None) == (not args.dirs):
        p.error("give run DIRs to report, or --wandb-view REPORT_DIR alone")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.wandb_view is not None:
            from clip_xai.report.wandb_view import save_view

            print(save_view(args.wandb_view, entity=args.wandb_entity, project=args.wandb_project).url)
            return 0
        from clip_xai.report.index import make_report

        r = make_report(args.dirs, out=args.out, n_boot=args.n_boot, seed=args.seed, grid_eps=args.grid_eps,
                        grid_samples=args.grid_samples, use_wandb=args.wandb, wandb_mode=args.wandb_mode,
                        wandb_project=args.wandb_project, wandb_entity=args.wandb_entity)
    except ClipXaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(r.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
