"""``samba-bids-demo``: write the offline demo dataset (simulated simultaneous EEG-fMRI).

Usage::

    samba-bids-demo OUTDIR [--subjects N] [--minutes M] [--seed S] [--resolution-mm R]
                    [--eeg-channels C] [--eeg-sfreq F] [--tr T] [--coarse-parcels K]
                    [--fine-parcels L] [--truth-dir DIR] [--eeg-only LABEL ...]
                    [--mr-artifacts | --non-simultaneous [--meg]] [--conditions N]
                    [--overwrite] [-v]

The BIDS dataset goes to OUTDIR, the ground truth to OUTDIR_groundtruth (or --truth-dir).
Exit codes: 0 success, 2 bad command line (argparse), 64 settings out of range, 73 OUTDIR (or the
truth directory) not empty without --overwrite / cannot be written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from samba_pipeline.__about__ import __version__
from samba_pipeline.cli.argtypes import nonneg_int, positive_float, positive_int
from samba_pipeline.errors import EXIT_CANTCREAT, EXIT_OK, SambaError


def build_parser() -> argparse.ArgumentParser:
    from samba_pipeline.simulate.dataset import (
        DEFAULT_COARSE_PARCELS,
        DEFAULT_FINE_PARCELS,
    )

    p = argparse.ArgumentParser(
        prog="samba-bids-demo",
        description=(
            "Write a simulated simultaneous EEG-fMRI BIDS dataset (with fMRIPrep-like "
            "derivatives and a demo atlas pair) and its ground truth, fully offline."
        ),
    )
    p.add_argument("outdir", metavar="OUTDIR", help="BIDS folder to create (must be empty or new)")
    p.add_argument("--subjects", type=positive_int, default=2, help="number of subjects (default 2)")
    p.add_argument("--minutes", type=positive_float, default=5.0,
                   help="fMRI run length in minutes (default 5)")
    p.add_argument("--seed", type=nonneg_int, default=42, help="random seed (default 42)")
    p.add_argument("--resolution-mm", type=positive_float, default=4.0,
                   help="isotropic MNI grid in mm, a whole number (default 4)")
    p.add_argument("--eeg-channels", type=positive_int, default=32,
                   help="number of EEG channels, 8-84 (default 32)")
    p.add_argument("--eeg-sfreq", type=positive_float, default=500.0,
                   help="EEG sampling rate in Hz (default 500)")
    p.add_argument("--tr", type=positive_float, default=2.0, help="fMRI repetition time in s (default 2)")
    p.add_argument("--coarse-parcels", type=positive_int, default=DEFAULT_COARSE_PARCELS,
                   help=f"coarse (EEG) parcels, >= 14 (default {DEFAULT_COARSE_PARCELS})")
    p.add_argument("--fine-parcels", type=positive_int, default=DEFAULT_FINE_PARCELS,
                   help=f"fine (fMRI) parcels, > coarse (default {DEFAULT_FINE_PARCELS})")
    p.add_argument("--truth-dir", default=None,
                   help="where to write the ground truth (default OUTDIR_groundtruth)")
    p.add_argument("--eeg-only", nargs="+", default=[], metavar="LABEL",
                   help="subjects whose fMRI is withheld (moved into the truth directory): EEG-only "
                   "subjects to apply a trained model to (samba-bids ... participant --model-file)")
    p.add_argument("--mr-artifacts", action="store_true",
                   help="simultaneous EEG with the uncorrected MR gradient and ballistocardiogram "
                   "artefacts and an ECG channel (samba-bids corrects them)")
    p.add_argument("--non-simultaneous", action="store_true",
                   help="EEG/MEG (ses-eeg/ses-meg) and fMRI (ses-mri) in separate sessions, both "
                   "watching the same movie segments (movie_segment events with stim_file); "
                   "process with samba-bids ... --pairing same-subject")
    p.add_argument("--meg", action="store_true",
                   help="MEG (FIF via mne-bids: 102 magnetometers + 204 planar gradiometers, "
                   "sphere-model lead field) instead of EEG; implies --non-simultaneous")
    p.add_argument("--conditions", type=nonneg_int, default=0, metavar="N",
                   help="simultaneous runs with N stimulus conditions: 20 s blocks of cond1..condN "
                   "(each raising one network's band power) between rest blocks, written as the "
                   "BOLD run's events.tsv (for the benchmark's stimulus classification)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing demo dataset in OUTDIR (and its truth directory)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-v: debug); -vv also shows tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--version", action="version", version=f"samba-bids-demo {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for errors, 0 for --help / --version
        return int(exc.code) if isinstance(exc.code, int) else 2

    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logger = logging.getLogger("samba_pipeline.simulate")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        from samba_pipeline.simulate import generate_demo_dataset

        bids_root, truth_dir = generate_demo_dataset(
            args.outdir,
            subjects=args.subjects,
            minutes=args.minutes,
            seed=args.seed,
            resolution_mm=args.resolution_mm,
            eeg_channels=args.eeg_channels,
            eeg_sfreq=args.eeg_sfreq,
            tr=args.tr,
            coarse_parcels=args.coarse_parcels,
            fine_parcels=args.fine_parcels,
            truth_dir=args.truth_dir,
            overwrite=args.overwrite,
            mr_artifacts=args.mr_artifacts,
            non_simultaneous=args.non_simultaneous or args.meg,
            meg=args.meg,
            conditions=args.conditions,
        )
        if args.eeg_only:
            from samba_pipeline.simulate.withhold import withhold_fmri

            withhold_fmri(bids_root, truth_dir, args.eeg_only)
    except SambaError as err:
        if args.verbose >= 2:
            raise
        print(f"samba-bids-demo: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if args.verbose >= 2:
            raise
        print(f"samba-bids-demo: error: {err}", file=sys.stderr)
        return EXIT_CANTCREAT
    finally:
        logger.removeHandler(handler)
    print(f"BIDS dataset: {bids_root}\nGround truth: {truth_dir}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
