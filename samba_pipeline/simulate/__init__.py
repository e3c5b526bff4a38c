"""The offline demo dataset generator (simultaneous EEG-fMRI with ground truth).

``generate_demo_dataset(outdir, ...)`` writes a BIDS raw dataset, fMRIPrep-like derivatives and
the DemoNested atlas pair to ``outdir`` and the ground truth beside it (docs/dataflow.md, §1).
"""

from samba_pipeline.simulate.dataset import (
    DEFAULT_COARSE_PARCELS,
    DEFAULT_FINE_PARCELS,
    default_truth_dir,
    generate_demo_dataset,
)

__all__ = [
    "DEFAULT_COARSE_PARCELS",
    "DEFAULT_FINE_PARCELS",
    "default_truth_dir",
    "generate_demo_dataset",
]
