"""Nuisance-regressor selection from fMRIPrep confounds files (XCP-D-style named strategies).

``select_confounds`` picks the regressors of a named strategy and reports motion QC. It never
censors volumes: dropping volumes would break the time alignment with the simultaneously
recorded EEG/MEG. High-motion volumes (framewise displacement above ``fd_threshold``) are only
reported.

Two loaders give the same columns, in the same order, with the same values:

* ``"nilearn"``: :func:`nilearn.interfaces.fmriprep.load_confounds`, used when the BOLD file
  carries fMRIPrep naming (``..._desc-preproc_bold.nii.gz``) and the confounds file sits next to
  it.
* ``"direct"``: the TSV (and its JSON sidecar, needed for aCompCor) is read here and the
  columns are selected by name; used when ``confounds_file=`` is given or the BOLD file is not
  named the fMRIPrep way.

Both fill the first row of derivative columns (``n/a`` in fMRIPrep's output) with the second
row, as nilearn does, and subtract each column's mean.

Non-steady-state volumes flagged by fMRIPrep (``non_steady_state_outlierXX``) are regressed out
with their one-hot columns (``non_steady_state="regress"``, the default except for ``"none"``)
rather than removed, for the same time-alignment reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from samba_pipeline.errors import SambaInputError, SambaMissingInputError

LOGGER = logging.getLogger(__name__)

MOTION_PARAMS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
EXPANSIONS = {
    "basic": ("",),
    "full": ("", "_derivative1", "_power2", "_derivative1_power2"),
}
DEFAULT_STRATEGY = "acompcor"


@dataclass(frozen=True)
class Strategy:
    """A named confound strategy: which fMRIPrep columns it regresses."""

    name: str
    description: str
    motion: str | None = None  # expansion model of the 6 motion parameters
    tissue: tuple[str, ...] = ()  # tissue signals (csf, white_matter, global_signal)
    tissue_model: str = "basic"
    n_acompcor: int = 0  # top anatomical CompCor components, combined WM+CSF mask
    cosine: bool = False  # DCT drift terms (required with CompCor)

    def nilearn_kwargs(self) -> dict:
        """Arguments of nilearn's load_confounds that select the same columns."""
        strategy: list[str] = []
        kwargs: dict = {}
        if self.motion:
            strategy.append("motion")
            kwargs["motion"] = self.motion
        if self.cosine:
            strategy.append("high_pass")
        wm_csf = {"csf", "white_matter"} & set(self.tissue)
        if wm_csf:
            strategy.append("wm_csf")
            kwargs["wm_csf"] = self.tissue_model
        if "global_signal" in self.tissue:
            strategy.append("global_signal")
            kwargs["global_signal"] = self.tissue_model
        if self.n_acompcor:
            strategy.append("compcor")
            kwargs["compcor"] = "anat_combined"
            kwargs["n_compcor"] = self.n_acompcor
        kwargs["strategy"] = tuple(strategy)
        return kwargs


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "24P",
            "Six motion parameters with their temporal derivatives, quadratic terms and squared "
            "derivatives (24 regressors).",
            motion="full",
        ),
        Strategy(
            "36P",
            "Six motion parameters and the mean global, CSF and white-matter signals, each with "
            "its temporal derivative, quadratic term and squared derivative (36 regressors).",
            motion="full",
            tissue=("global_signal", "csf", "white_matter"),
            tissue_model="full",
        ),
        Strategy(
            "acompcor",
            "24 motion regressors, the top 5 anatomical CompCor components from the combined "
            "white-matter and CSF mask, and fMRIPrep's discrete-cosine drift terms.",
            motion="full",
            n_acompcor=5,
            cosine=True,
        ),
        Strategy(
            "acompcor_gsr",
            "24 motion regressors, the top 5 anatomical CompCor components from the combined "
            "white-matter and CSF mask, the mean global signal, and fMRIPrep's discrete-cosine "
            "drift terms.",
            motion="full",
            tissue=("global_signal",),
            n_acompcor=5,
            cosine=True,
        ),
        Strategy("gsr_only", "The mean global signal only.", tissue=("global_signal",)),
        Strategy("none", "No nuisance regression."),
    )
}


def list_strategies() -> list[str]:
    """Names of the built-in confound strategies."""
    return list(STRATEGIES)


def select_confounds(
    bold_file: str | os.PathLike | None,
    strategy: str = DEFAULT_STRATEGY,
    confounds_file: str | os.PathLike | None = None,
    fd_threshold: float = 0.5,
    n_volumes: int | None = None,
    *,
    non_steady_state: str = "regress",
    loader: str = "auto",
) -> tuple[pd.DataFrame, dict]:
    """Select the nuisance regressors of a named strategy from an fMRIPrep confounds file.

    Parameters
    ----------
    bold_file
        The preprocessed BOLD (fMRIPrep naming, ``..._desc-preproc_bold.nii.gz``). Its header
        gives the number of volumes when ``n_volumes`` is None; its name locates the confounds
        file when ``confounds_file`` is None. May be None when both of those are given.
    strategy
        ``"24P"``, ``"36P"``, ``"acompcor"`` (default), ``"acompcor_gsr"``, ``"gsr_only"`` or
        ``"none"``.
    confounds_file
        The ``*_desc-confounds_timeseries.tsv``; read directly (``loader="direct"``).
    fd_threshold
        Framewise displacement (mm) above which a volume is reported as high-motion. Volumes
        are never removed.
    n_volumes
        Number of BOLD volumes the confounds must match (read from ``bold_file`` if None).
    non_steady_state
        ``"regress"``: add fMRIPrep's ``non_steady_state_outlierXX`` one-hot columns as
        regressors (not for strategy ``"none"``); ``"ignore"``: leave them out. Either way the
        volumes are listed in the QC.
    loader
        ``"auto"`` (nilearn when the BOLD is fMRIPrep-named and no ``confounds_file`` is given,
        else direct), ``"nilearn"`` or ``"direct"``.

    Returns
    -------
    regressors
        DataFrame, one row per volume, one column per regressor, mean-free (0 columns for
        ``"none"``).
    qc
        JSON-serialisable dict: ``strategy``, ``description``, ``loader``, ``confounds_file``,
        ``columns``, ``n_regressors``, ``n_volumes``, ``fd_threshold``, ``high_motion_volumes``,
        ``n_high_motion``, ``high_motion_fraction``, ``mean_fd``, ``max_fd``,
        ``non_steady_state_volumes``, ``warnings``.
    """
    if strategy not in STRATEGIES:
        raise SambaInputError(
            f"unknown confound strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}",
            path=confounds_file or bold_file,
        )
    if non_steady_state not in ("regress", "ignore"):
        raise SambaInputError(
            f"non_steady_state must be 'regress' or 'ignore', not {non_steady_state!r}",
            path=confounds_file or bold_file,
        )
    if loader not in ("auto", "nilearn", "direct"):
        raise SambaInputError(
            f"confound loader must be 'auto', 'nilearn' or 'direct', not {loader!r}",
            path=confounds_file or bold_file,
        )
    spec = STRATEGIES[strategy]
    qc_warnings: list[str] = []

    located = confounds_file is None
    if located:
        if bold_file is None:
            raise SambaMissingInputError("neither a BOLD file nor a confounds file was given")
        confounds_file = find_confounds_file(bold_file)
    confounds_file = Path(confounds_file)
    if not confounds_file.is_file():
        raise SambaMissingInputError("confounds file not found", path=confounds_file)

    if n_volumes is None:
        if bold_file is None:
            raise SambaInputError(
                "the number of BOLD volumes is unknown (give bold_file or n_volumes)",
                path=confounds_file,
            )
        n_volumes = _n_volumes_from_header(bold_file)

    raw = _read_confounds_tsv(confounds_file)
    if len(raw) != n_volumes:
        raise SambaInputError(
            f"confounds file has {len(raw)} rows but the BOLD series has {n_volumes} volumes",
            path=confounds_file,
        )

    meta = _read_confounds_json(confounds_file, required=spec.n_acompcor > 0)
    columns = _strategy_columns(spec, raw, meta, confounds_file, qc_warnings)

    nss_cols = sorted(c for c in raw.columns if c.startswith("non_steady_state_outlier"))
    nss_volumes = (
        sorted(int(i) for i in np.flatnonzero(raw[nss_cols].to_numpy().sum(axis=1) > 0))
        if nss_cols
        else []
    )
    add_nss = non_steady_state == "regress" and strategy != "none" and bool(nss_cols)

    selected = raw[columns].copy()
    _fill_first_row(selected)
    bad = selected.columns[selected.isna().any(axis=0).to_numpy()].tolist()
    if bad:
        n_bad = int(selected.isna().to_numpy().sum())
        raise SambaInputError(
            f"{n_bad} n/a value(s) remain after filling the first row, in column(s) "
            f"{', '.join(bad)}",
            path=confounds_file,
        )

    use_nilearn = loader == "nilearn" or (
        loader == "auto" and located and _is_fmriprep_bold(bold_file)
    )
    if loader == "nilearn" and (
        bold_file is None
        or not _is_fmriprep_bold(bold_file)
        or Path(find_confounds_file(bold_file, must_exist=False)).resolve()
        != confounds_file.resolve()
    ):
        raise SambaInputError(
            "the nilearn confound loader needs a BOLD file named "
            "'..._desc-preproc_bold.nii.gz' next to its confounds file",
            path=bold_file or confounds_file,
        )
    if not columns:
        regressors = pd.DataFrame(index=pd.RangeIndex(n_volumes))
        used_loader = "none"
    elif use_nilearn:
        regressors = _load_with_nilearn(bold_file, spec, columns, confounds_file)
        used_loader = "nilearn"
    else:
        regressors = selected - selected.mean(axis=0)
        used_loader = "direct"

    if add_nss:
        nss = raw[nss_cols].astype(float)
        regressors = pd.concat([regressors, nss], axis=1)
    regressors = regressors.reset_index(drop=True).astype(float)

    qc = {
        "strategy": strategy,
        "description": spec.description,
        "loader": used_loader,
        "confounds_file": str(confounds_file),
        "columns": list(regressors.columns),
        "n_regressors": int(regressors.shape[1]),
        "n_volumes": int(n_volumes),
        "non_steady_state_volumes": nss_volumes,
        "warnings": qc_warnings,
    }
    qc.update(motion_qc(raw, fd_threshold, confounds_file, qc_warnings))
    for message in qc_warnings:
        LOGGER.warning("%s: %s", confounds_file, message)
    return regressors, qc


def motion_qc(
    raw: pd.DataFrame,
    fd_threshold: float = 0.5,
    confounds_file: str | os.PathLike | None = None,
    qc_warnings: list[str] | None = None,
) -> dict:
    """High-motion volumes (FD > ``fd_threshold``, mm) and FD summary; nothing is censored."""
    if not np.isfinite(fd_threshold) or fd_threshold <= 0:
        raise SambaInputError(
            f"fd_threshold must be a positive number of mm, not {fd_threshold!r}",
            path=confounds_file,
        )
    out = {
        "fd_threshold": float(fd_threshold),
        "high_motion_volumes": None,
        "n_high_motion": None,
        "high_motion_fraction": None,
        "mean_fd": None,
        "max_fd": None,
    }
    if "framewise_displacement" not in raw.columns:
        if qc_warnings is not None:
            qc_warnings.append("no framewise_displacement column: motion QC not available")
        return out
    # FD of the first volume is n/a in fMRIPrep's output (no previous volume): count it as 0.
    fd = raw["framewise_displacement"].to_numpy(dtype=float, na_value=np.nan)
    fd = np.where(np.isnan(fd), 0.0, fd)
    high = np.flatnonzero(fd > fd_threshold)
    out.update(
        high_motion_volumes=[int(i) for i in high],
        n_high_motion=int(high.size),
        high_motion_fraction=float(high.size / max(fd.size, 1)),
        mean_fd=float(fd.mean()) if fd.size else None,
        max_fd=float(fd.max()) if fd.size else None,
    )
    return out


def find_confounds_file(bold_file: str | os.PathLike, must_exist: bool = True) -> str:
    """The fMRIPrep confounds TSV that belongs to a preprocessed BOLD file.

    Drops the ``space``, ``res``, ``den``, ``cohort`` and ``desc`` entities and the ``bold``
    suffix, then looks for ``_desc-confounds_timeseries.tsv`` (fMRIPrep >= 20.2) or
    ``_desc-confounds_regressors.tsv`` (older) in the same folder.
    """
    bold_file = Path(bold_file)
    name = bold_file.name
    stem = re.sub(r"_bold\.(nii\.gz|nii|dtseries\.nii|func\.gii)$", "", name)
    if stem == name:
        stem = name.split(".")[0]
        stem = re.sub(r"_[A-Za-z0-9]+$", "", stem)  # any suffix
    stem = re.sub(r"_(space|res|den|cohort|desc|hemi)-[A-Za-z0-9]+", "", stem)
    candidates = [
        bold_file.parent / f"{stem}_desc-confounds_timeseries.tsv",
        bold_file.parent / f"{stem}_desc-confounds_regressors.tsv",
    ]
    for cand in candidates:
        if cand.is_file():
            return str(cand)
    if must_exist:
        raise SambaMissingInputError(
            f"confounds file not found next to the BOLD (expected {candidates[0].name})",
            path=candidates[0],
        )
    return str(candidates[0])


# --------------------------------------------------------------------------------------------
# helpers


def _is_fmriprep_bold(bold_file) -> bool:
    return bool(re.search(r"(_space-.*)?_desc-preproc_bold\.nii\.gz$", str(bold_file)))


def _n_volumes_from_header(bold_file) -> int:
    import nibabel as nib

    try:
        img = nib.load(os.fspath(bold_file))
    except FileNotFoundError as exc:
        raise SambaMissingInputError("BOLD file not found", path=bold_file) from exc
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise SambaInputError(f"cannot read the BOLD image ({exc})", path=bold_file) from exc
    if len(img.shape) != 4:
        raise SambaInputError(
            f"BOLD image is {len(img.shape)}-D (shape {img.shape}), expected 4-D", path=bold_file
        )
    return int(img.shape[3])


def _read_confounds_tsv(path: Path) -> pd.DataFrame:
    try:
        raw = pd.read_csv(path, sep="\t", na_values=["n/a", "N/A", "NaN", "nan", ""])
    except pd.errors.EmptyDataError as exc:
        raise SambaInputError("confounds file is empty", path=path) from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SambaInputError(f"confounds file is not a readable TSV ({exc})", path=path) from exc
    non_numeric = [c for c in raw.columns if not pd.api.types.is_numeric_dtype(raw[c])]
    if non_numeric:
        raise SambaInputError(
            f"confounds file has non-numeric column(s) {', '.join(non_numeric[:10])}", path=path
        )
    return raw


def _read_confounds_json(tsv: Path, required: bool) -> dict | None:
    json_path = tsv.with_name(tsv.name[: -len(".tsv")] + ".json")
    if not json_path.is_file():
        if required:
            raise SambaMissingInputError(
                "confounds JSON sidecar not found; anatomical CompCor needs its 'Mask' metadata",
                path=json_path,
            )
        return None
    try:
        with open(json_path, encoding="utf-8") as fobj:
            meta = json.load(fobj)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SambaInputError(f"confounds JSON sidecar is not valid JSON ({exc})",
                              path=json_path) from None
    if not isinstance(meta, dict):
        raise SambaInputError("confounds JSON sidecar is not a JSON object", path=json_path)
    return meta


def _expand(params, model: str) -> list[str]:
    """Columns of ``params`` with expansions, grouped by expansion (all bases first)."""
    return [f"{p}{suffix}" for suffix in EXPANSIONS[model] for p in params]


def _acompcor_columns(meta: dict, n: int) -> list[str]:
    """Top ``n`` aCompCor components of the combined mask, in component order (as nilearn)."""
    comps = [
        key
        for key, value in meta.items()
        if re.fullmatch(r"a_comp_cor_\d+", key)
        and isinstance(value, dict)
        and value.get("Mask") == "combined"
    ]
    comps.sort(key=lambda key: int(key.rsplit("_", 1)[1]))
    return comps[:n]


def _strategy_columns(spec: Strategy, raw, meta, confounds_file: Path, qc_warnings) -> list[str]:
    wanted: list[str] = []
    if spec.motion:
        wanted += _expand(MOTION_PARAMS, spec.motion)
    if spec.tissue:
        wanted += _expand(spec.tissue, spec.tissue_model)
    if spec.n_acompcor:
        comps = _acompcor_columns(meta, spec.n_acompcor)
        if not comps:
            raise SambaInputError(
                "confounds JSON lists no anatomical CompCor component with Mask 'combined' "
                f"(needed by strategy {spec.name!r})",
                path=confounds_file.with_name(confounds_file.name[:-4] + ".json"),
            )
        if len(comps) < spec.n_acompcor:
            qc_warnings.append(
                f"only {len(comps)} combined-mask aCompCor components (strategy asks for "
                f"{spec.n_acompcor})"
            )
        wanted += comps
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise SambaInputError(
            f"confounds file lacks column(s) required by strategy {spec.name!r}: "
            f"{', '.join(missing)}",
            path=confounds_file,
        )
    if spec.cosine:
        cosines = sorted(c for c in raw.columns if c.startswith("cosine"))
        if not cosines:
            qc_warnings.append("no cosine drift columns in the confounds file")
        wanted += cosines
    return wanted


def _fill_first_row(frame: pd.DataFrame) -> None:
    """fMRIPrep writes n/a in the first row of derivatives: use the second row (as nilearn)."""
    if len(frame) > 1:
        first = frame.iloc[0].isna().to_numpy()
        if first.any():
            frame.iloc[0, first] = frame.iloc[1, first].to_numpy()


def _load_with_nilearn(bold_file, spec: Strategy, columns, confounds_file) -> pd.DataFrame:
    from nilearn.interfaces.fmriprep import load_confounds

    kwargs = spec.nilearn_kwargs()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            frame, _sample_mask = load_confounds(os.fspath(bold_file), demean=True, **kwargs)
    except ValueError as exc:  # nilearn reports missing files/columns as ValueError
        raise SambaInputError(
            f"nilearn could not load the confounds ({str(exc).splitlines()[0]})",
            path=confounds_file,
        ) from exc
    # sample_mask is deliberately ignored: no censoring (it only reflects non-steady-state
    # volumes here, handled by regression in select_confounds).
    if set(frame.columns) != set(columns):
        raise RuntimeError(
            f"nilearn selected {sorted(frame.columns)} but samba-bids expected {sorted(columns)}"
        )
    frame = frame[list(columns)]
    # nilearn demeans over the volumes its sample_mask keeps (it leaves out non-steady-state
    # volumes); nothing is censored here, so centre over all volumes like the direct loader.
    return frame - frame.mean(axis=0)
