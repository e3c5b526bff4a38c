"""Parcel-mean BOLD time series with nuisance regression and temporal filtering.

``parcellate_bold`` resamples the atlas onto the BOLD grid (nearest neighbour), measures each
parcel's coverage by the brain mask, and extracts the parcel means with nilearn's
:class:`~nilearn.maskers.NiftiLabelsMasker`, which also detrends, filters and regresses the
confounds (:func:`nilearn.signal.clean`) and standardises. Parcels whose coverage is below
``min_coverage`` come back as all-NaN columns (as XCP-D does), so the output always has one
column per row of the label table, in the table's order.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from samba_pipeline.errors import SambaInputError, SambaMissingInputError

LOGGER = logging.getLogger(__name__)

#: Atlas/BOLD bounding boxes must share at least this fraction of the smaller box.
MIN_BBOX_OVERLAP = 0.5


def parcellate_bold(
    bold_img,
    atlas_img,
    labels,
    *,
    mask_img=None,
    confounds=None,
    tr: float | None,
    high_pass: float | None = 0.01,
    low_pass: float | None = None,
    standardize="zscore_sample",
    detrend: bool = True,
    min_coverage: float = 0.5,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parcel time series of a preprocessed BOLD run.

    Parameters
    ----------
    bold_img
        4-D BOLD image (path or nibabel image), e.g. fMRIPrep's ``desc-preproc_bold``.
    atlas_img
        3-D integer label image (path or nibabel image), 0 = background.
    labels
        Label table (DataFrame or path to a ``dseg.tsv``) with columns ``index`` and ``name``.
        Output columns follow its row order.
    mask_img
        Brain mask (path or image); resampled to the BOLD grid (nearest) if needed. Without a
        mask, the voxels whose BOLD values vary over time are used.
    confounds
        Regressors (DataFrame or array, one row per volume), e.g. from
        :func:`samba_pipeline.fmri.confounds.select_confounds`; None or 0 columns for none.
    tr
        Repetition time in seconds.
    high_pass, low_pass
        Butterworth cut-offs in Hz (None = no filter), applied by nilearn to data and
        confounds alike.
    standardize
        ``"zscore_sample"`` (default), ``"zscore"``, ``"psc"``, or False/None for none.
    detrend
        Remove linear trends (data and confounds).
    min_coverage
        Parcels whose fraction of (resampled) voxels inside the mask is below this get NaN.

    Returns
    -------
    timeseries
        ``n_volumes x n_parcels`` DataFrame, columns = label names in table order.
    coverage
        One row per table row: ``index``, ``name``, ``coverage`` (fraction of the parcel's
        voxels on the BOLD grid that lie inside the mask), ``n_voxels`` (voxels averaged),
        ``n_voxels_atlas`` (voxels of the parcel on the BOLD grid) and ``used`` (coverage >=
        min_coverage).
    """
    bold, bold_path = _load_img(bold_img, "BOLD image")
    if len(bold.shape) != 4:
        raise SambaInputError(
            f"BOLD image is {len(bold.shape)}-D (shape {tuple(bold.shape)}), expected 4-D",
            path=bold_path,
        )
    n_vols = int(bold.shape[3])
    if n_vols < 3:
        raise SambaInputError(f"BOLD series has only {n_vols} volume(s)", path=bold_path)
    tr = check_repetition_time(tr, bold_path)
    standardize = _check_standardize(standardize, bold_path)
    _check_filter(high_pass, low_pass, tr, bold_path)
    if not (0.0 <= float(min_coverage) <= 1.0):
        raise SambaInputError(
            f"min_coverage must lie in [0, 1], not {min_coverage!r}", path=bold_path
        )

    table, table_path = _load_label_table(labels)
    atlas, atlas_path = _load_img(atlas_img, "atlas image")
    atlas_data = _atlas_data(atlas, atlas_path)
    table_ids = table["index"].to_numpy(dtype=np.int64)
    names = table["name"].astype(str).tolist()
    _check_label_sets(atlas_data, table_ids, names, atlas_path, table_path)
    _check_bounding_boxes(bold, atlas, atlas_data, bold_path, atlas_path)

    ref3d = nib.Nifti1Image(np.zeros(bold.shape[:3], np.uint8), bold.affine)
    if mask_img is not None:
        mask, mask_path = _load_img(mask_img, "brain mask")
        mask = _as_3d(mask, mask_path, "brain mask")
        if not _same_grid(mask, ref3d):
            mask = _resample_nearest(mask, ref3d)
        mask_data = np.asarray(mask.dataobj) > 0
        if not mask_data.any():
            raise SambaInputError("brain mask is empty on the BOLD grid", path=mask_path)
    else:
        mask_path = None
        mask_data = None  # the voxels that vary over time, found while streaming the series

    atlas3d = nib.Nifti1Image(atlas_data.astype(np.int32), atlas.affine)
    if _same_grid(atlas3d, ref3d):
        atlas_res = atlas_data
    else:
        atlas_res = np.asarray(_resample_nearest(atlas3d, ref3d).dataobj).astype(np.int64)

    # One streaming pass over the BOLD (volume by volume, never the whole 4-D array in memory):
    # keep the time series of the labelled voxels only, check finiteness everywhere.
    labelled_any = atlas_res != 0
    voxel_series, varying = _stream_labelled_voxels(bold, labelled_any, bold_path,
                                                    need_variance=mask_data is None)
    if mask_data is None:
        mask_data = varying
        if not mask_data.any():
            raise SambaInputError("every BOLD voxel is constant over time", path=bold_path)

    # Coverage, vectorised over parcels: position of each voxel's label in the table.
    order = np.argsort(table_ids)
    sorted_ids = table_ids[order]
    pos = np.searchsorted(sorted_ids, atlas_res)
    pos = np.clip(pos, 0, len(sorted_ids) - 1)
    labelled = (atlas_res != 0) & (sorted_ids[pos] == atlas_res)
    table_pos = order[pos]
    n_parcels = len(table_ids)
    n_atlas = np.bincount(table_pos[labelled], minlength=n_parcels)
    n_inside = np.bincount(table_pos[labelled & mask_data], minlength=n_parcels)
    coverage = np.divide(
        n_inside, n_atlas, out=np.zeros(n_parcels, dtype=float), where=n_atlas > 0
    )
    if not (n_inside > 0).any():
        where = "brain mask" if mask_img is not None else "BOLD field of view"
        raise SambaInputError(
            f"atlas does not overlap the {where}: no parcel has any voxel inside it",
            path=atlas_path,
        )
    used = (coverage >= min_coverage) & (n_inside > 0)
    if not used.any():
        raise SambaInputError(
            f"no parcel reaches min_coverage={min_coverage} (best coverage {coverage.max():.2f})",
            path=atlas_path,
        )
    low = [names[i] for i in np.flatnonzero(~used)]
    if low:
        LOGGER.warning(
            "%s: %d parcel(s) below min_coverage=%s get n/a: %s",
            atlas_path or "atlas",
            len(low),
            min_coverage,
            ", ".join(low[:10]) + (" ..." if len(low) > 10 else ""),
        )

    # Parcel means of the used parcels (a sparse averaging matrix over the labelled voxels),
    # then nilearn's signal cleaning on the parcel series, exactly as NiftiLabelsMasker does
    # (it, too, averages first and cleans the region signals).
    keep_voxel = labelled & mask_data & used[table_pos]
    conf = _check_confounds(confounds, n_vols, bold_path)
    expected = np.sort(table_ids[used])
    cols = order[np.searchsorted(sorted_ids, expected)]
    signals = _parcel_means(voxel_series, table_pos[labelled_any], keep_voxel[labelled_any], cols)
    del voxel_series
    # A parcel whose mean signal never changes (e.g. voxels zeroed or masked out upstream) has no
    # time series to standardise or correlate: n/a, like a parcel below the coverage threshold.
    scale = np.maximum(np.abs(signals).max(axis=0), np.finfo(np.float32).tiny)
    flat = np.ptp(signals, axis=0) <= 1e-6 * scale
    if flat.all():
        raise SambaInputError("the BOLD signal is constant over time in every parcel of the atlas",
                              path=bold_path)
    if flat.any():
        flat_names = [names[i] for i in cols[flat]]
        LOGGER.warning("%s: %d parcel(s) have a constant (zero-variance) BOLD signal and get n/a: %s",
                       bold_path or "BOLD", len(flat_names),
                       ", ".join(flat_names[:10]) + (" ..." if len(flat_names) > 10 else ""))
        used[cols[flat]] = False
        cols, signals = cols[~flat], signals[:, ~flat]
    from nilearn.signal import clean

    signals = clean(signals, detrend=bool(detrend), standardize=standardize,
                    standardize_confounds=True, t_r=tr, low_pass=low_pass, high_pass=high_pass,
                    confounds=conf)
    out = np.full((n_vols, n_parcels), np.nan)
    out[:, cols] = np.asarray(signals, dtype=float)
    timeseries = pd.DataFrame(out, columns=names)
    coverage_df = pd.DataFrame(
        {
            "index": table_ids,
            "name": names,
            "coverage": coverage,
            "n_voxels": np.where(used, n_inside, 0),
            "n_voxels_atlas": n_atlas,
            "used": used,
        }
    )
    return timeseries, coverage_df


def read_repetition_time(bold_json_or_img) -> float:
    """RepetitionTime (s) from a BOLD JSON sidecar.

    Accepts the sidecar path, the BOLD NIfTI path (its ``.json`` sidecar is read), or a
    nibabel image: its file's sidecar if it was loaded from disk, else the header's 4th zoom.
    """
    if isinstance(bold_json_or_img, nib.spatialimages.SpatialImage):
        fname = bold_json_or_img.get_filename()
        if fname is None:
            return _tr_from_header(bold_json_or_img)
        bold_json_or_img = fname
    path = Path(bold_json_or_img)
    if path.suffix != ".json":
        name = path.name
        for ext in (".nii.gz", ".nii", ".dtseries.nii", ".func.gii"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        path = path.with_name(name + ".json")
    if not path.is_file():
        raise SambaMissingInputError("BOLD JSON sidecar (RepetitionTime) not found", path=path)
    try:
        with open(path, encoding="utf-8") as fobj:
            meta = json.load(fobj)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SambaInputError(f"JSON sidecar is not valid JSON ({exc})", path=path) from exc
    if not isinstance(meta, dict) or "RepetitionTime" not in meta:
        raise SambaInputError("JSON sidecar has no RepetitionTime", path=path)
    return check_repetition_time(meta["RepetitionTime"], path)


# --------------------------------------------------------------------------------------------
# helpers


def _tr_from_header(img) -> float:
    zooms = img.header.get_zooms()
    if len(zooms) < 4:
        raise SambaInputError("image has no 4th dimension to read a repetition time from")
    tr = float(zooms[3])
    try:
        unit = img.header.get_xyzt_units()[1]
    except Exception:  # noqa: BLE001 - non-NIfTI headers
        unit = "sec"
    if unit == "msec":
        tr /= 1000.0
    elif unit == "usec":
        tr /= 1e6
    return check_repetition_time(tr, None)


def check_repetition_time(tr, path) -> float:
    """A repetition time as a positive float, or a clear error naming ``path``."""
    if tr is None or isinstance(tr, bool):
        raise SambaInputError("repetition time (TR) is missing", path=path)
    try:
        value = float(tr)
    except (TypeError, ValueError):
        raise SambaInputError(f"repetition time {tr!r} is not a number", path=path) from None
    if not np.isfinite(value) or value <= 0:
        raise SambaInputError(f"repetition time must be positive, got {tr!r}", path=path)
    return value


def _check_standardize(standardize, path):
    if standardize is None or standardize is False:
        return None
    if standardize is True:
        return "zscore_sample"
    if standardize in ("zscore_sample", "zscore", "psc"):
        return standardize
    raise SambaInputError(
        f"standardize must be 'zscore_sample', 'zscore', 'psc' or False, not {standardize!r}",
        path=path,
    )


def _check_filter(high_pass, low_pass, tr, path) -> None:
    nyquist = 0.5 / tr
    for name, value in (("high_pass", high_pass), ("low_pass", low_pass)):
        if value is None:
            continue
        if not np.isfinite(value) or value <= 0:
            raise SambaInputError(f"{name} must be a positive frequency, not {value!r}", path=path)
        if value >= nyquist:
            raise SambaInputError(
                f"{name}={value} Hz is not below the Nyquist frequency {nyquist:.4g} Hz "
                f"(TR {tr} s)",
                path=path,
            )
    if high_pass is not None and low_pass is not None and high_pass >= low_pass:
        raise SambaInputError(
            f"high_pass={high_pass} Hz must be below low_pass={low_pass} Hz", path=path
        )


def _iter_volumes(img, path):
    """The volumes of a 4-D image one at a time (float32), streaming gzip files sequentially."""
    proxy = img.dataobj
    shape = tuple(int(n) for n in img.shape)
    if not isinstance(proxy, nib.arrayproxy.ArrayProxy):
        data = np.asarray(proxy)
        for t in range(shape[3]):
            yield np.asarray(data[..., t], dtype=np.float32)
        return
    nbytes = int(np.prod(shape[:3])) * proxy.dtype.itemsize
    slope = 1.0 if proxy.slope is None or not np.isfinite(proxy.slope) else float(proxy.slope)
    inter = 0.0 if proxy.inter is None or not np.isfinite(proxy.inter) else float(proxy.inter)
    try:
        with nib.openers.ImageOpener(proxy.file_like) as fobj:
            fobj.seek(proxy.offset)
            for _ in range(shape[3]):
                buf = fobj.read(nbytes)
                if len(buf) != nbytes:
                    raise SambaInputError("BOLD file is truncated (fewer volumes than its header says)",
                                          path=path)
                vol = np.frombuffer(buf, dtype=proxy.dtype).reshape(shape[:3], order=proxy.order)
                vol = vol.astype(np.float32)
                if slope != 1.0 or inter != 0.0:
                    vol = vol * np.float32(slope) + np.float32(inter)
                yield vol
    except (OSError, EOFError, ValueError) as exc:
        raise SambaInputError(f"cannot read the BOLD series ({exc})", path=path) from None


def _stream_labelled_voxels(bold, labelled, path, *, need_variance: bool):
    """Time series [n_labelled, T] of the labelled voxels; voxels that vary over time (3-D)."""
    n_vols = int(bold.shape[3])
    idx = np.flatnonzero(labelled.ravel(order="C"))
    series = np.empty((idx.size, n_vols), dtype=np.float32)
    vmin = vmax = None
    bad = None
    for t, vol in enumerate(_iter_volumes(bold, path)):
        flat = vol.ravel(order="C")
        finite = np.isfinite(flat)
        if not finite.all():
            bad = ~finite if bad is None else bad | ~finite
        series[:, t] = flat[idx]
        if need_variance:
            if vmin is None:
                vmin, vmax = flat.copy(), flat.copy()
            else:
                np.minimum(vmin, flat, out=vmin)
                np.maximum(vmax, flat, out=vmax)
    if bad is not None:
        raise SambaInputError(
            f"BOLD image contains NaN or Inf values in {int(bad.sum())} voxel(s)", path=path)
    varying = None
    if need_variance:
        varying = (vmax > vmin).reshape(labelled.shape, order="C")
    return series, varying


def _parcel_means(series, positions, keep, cols):
    """Mean over the kept voxels of each parcel (rows of ``series`` belong to ``positions``)."""
    from scipy import sparse

    rows = positions[keep]
    lookup = -np.ones(int(positions.max()) + 1 if positions.size else 1, dtype=np.int64)
    lookup[cols] = np.arange(len(cols))
    out_rows = lookup[rows]
    ok = out_rows >= 0
    counts = np.bincount(out_rows[ok], minlength=len(cols)).astype(np.float64)
    weights = 1.0 / counts[out_rows[ok]]
    avg = sparse.csr_matrix((weights, (out_rows[ok], np.flatnonzero(keep)[ok])),
                            shape=(len(cols), series.shape[0]))
    return np.asarray(avg @ series.astype(np.float64, copy=False)).T  # [T, n_used]


def _load_img(img, what):
    """Return (image, filename or None); file errors become Samba errors."""
    if isinstance(img, (str, os.PathLike)):
        path = os.fspath(img)
        if not os.path.isfile(path):
            raise SambaMissingInputError(f"{what} not found", path=path)
        try:
            return nib.load(path), path
        except Exception as exc:
            raise SambaInputError(f"cannot read the {what} ({exc})", path=path) from exc
    if isinstance(img, nib.spatialimages.SpatialImage):
        return img, img.get_filename()
    raise SambaInputError(f"{what} must be a file path or a nibabel image, not {type(img)}")


def _as_3d(img, path, what):
    if len(img.shape) == 4 and img.shape[3] == 1:
        return nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine)
    if len(img.shape) != 3:
        raise SambaInputError(
            f"{what} is {len(img.shape)}-D (shape {tuple(img.shape)}), expected 3-D", path=path
        )
    return img


def _atlas_data(atlas, path) -> np.ndarray:
    atlas = _as_3d(atlas, path, "atlas image")
    raw = np.asarray(atlas.dataobj)
    if not np.isfinite(raw).all():
        raise SambaInputError("atlas image contains NaN or Inf values", path=path)
    data = np.rint(raw).astype(np.int64)
    if not np.array_equal(data, raw):
        raise SambaInputError(
            "atlas image holds non-integer values; a label (dseg) image is needed", path=path
        )
    if (data < 0).any():
        raise SambaInputError("atlas image holds negative labels", path=path)
    return data


def _load_label_table(labels):
    path = None
    if isinstance(labels, (str, os.PathLike)):
        path = os.fspath(labels)
        if not os.path.isfile(path):
            raise SambaMissingInputError("atlas label table not found", path=path)
        try:
            labels = pd.read_csv(path, sep="\t")
        except Exception as exc:
            raise SambaInputError(f"cannot read the atlas label table ({exc})", path=path) from exc
    if not isinstance(labels, pd.DataFrame):
        raise SambaInputError("atlas labels must be a DataFrame or a path to a dseg.tsv")
    path = path or labels.attrs.get("path")
    missing = [c for c in ("index", "name") if c not in labels.columns]
    if missing:
        raise SambaInputError(f"atlas label table lacks column(s) {', '.join(missing)}", path=path)
    if labels.empty:
        raise SambaInputError("atlas label table has no rows", path=path)
    idx = pd.to_numeric(labels["index"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(idx).all() or not np.array_equal(idx, np.rint(idx)) or (idx <= 0).any():
        raise SambaInputError("atlas label table 'index' must hold positive integers", path=path)
    dup = labels["index"][labels["index"].duplicated()].tolist()
    if dup:
        raise SambaInputError(f"atlas label table repeats index value(s) {dup[:10]}", path=path)
    dup_names = labels["name"][labels["name"].duplicated()].astype(str).tolist()
    if dup_names:
        raise SambaInputError(
            f"atlas label table repeats name(s) {', '.join(dup_names[:10])}", path=path
        )
    table = labels.reset_index(drop=True).copy()
    table["index"] = idx.astype(np.int64)
    return table, path


def _check_label_sets(atlas_data, table_ids, names, atlas_path, table_path) -> None:
    image_ids = np.unique(atlas_data)
    image_ids = image_ids[image_ids != 0]
    extra = np.setdiff1d(image_ids, table_ids)
    if extra.size:
        raise SambaInputError(
            f"atlas image has {extra.size} label(s) missing from the label table: "
            f"{extra[:10].tolist()}" + (" ..." if extra.size > 10 else ""),
            path=atlas_path,
        )
    absent = ~np.isin(table_ids, image_ids)
    if absent.any():
        absent_names = [names[i] for i in np.flatnonzero(absent)]
        LOGGER.warning(
            "%s: %d label-table row(s) absent from the atlas image (their columns are n/a): %s",
            table_path or atlas_path or "atlas",
            len(absent_names),
            ", ".join(absent_names[:10]),
        )


def _world_bbox(affine, ijk_min, ijk_max):
    """Axis-aligned world bounding box of the voxel box [ijk_min-0.5, ijk_max+0.5]."""
    lo = np.asarray(ijk_min, float) - 0.5
    hi = np.asarray(ijk_max, float) + 0.5
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def _check_bounding_boxes(bold, atlas, atlas_data, bold_path, atlas_path) -> None:
    nz = np.nonzero(atlas_data)
    if nz[0].size == 0:
        raise SambaInputError("atlas image holds no labels (all zero)", path=atlas_path)
    a_lo, a_hi = _world_bbox(atlas.affine, [n.min() for n in nz], [n.max() for n in nz])
    b_lo, b_hi = _world_bbox(bold.affine, [0, 0, 0], np.asarray(bold.shape[:3]) - 1)
    inter = np.clip(np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo), 0, None).prod()
    smaller = min((a_hi - a_lo).prod(), (b_hi - b_lo).prod())
    frac = float(inter / smaller) if smaller > 0 else 0.0
    if frac < MIN_BBOX_OVERLAP:
        raise SambaInputError(
            f"atlas and BOLD bounding boxes overlap by only {100 * frac:.0f}% "
            "(are they in the same space?)",
            path=atlas_path or bold_path,
        )


def _same_grid(a, b) -> bool:
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=1e-4)


def _resample_nearest(img, ref):
    from nilearn.image import resample_to_img

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resample_to_img(
            img, ref, interpolation="nearest", force_resample=True, copy_header=True
        )


def _check_confounds(confounds, n_vols, path):
    if confounds is None:
        return None
    arr = np.asarray(
        confounds.to_numpy() if isinstance(confounds, pd.DataFrame) else confounds, dtype=float
    )
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise SambaInputError(f"confounds must be 2-D, got shape {arr.shape}", path=path)
    if arr.shape[1] == 0:
        return None
    if arr.shape[0] != n_vols:
        raise SambaInputError(
            f"confounds have {arr.shape[0]} rows but the BOLD series has {n_vols} volumes",
            path=path,
        )
    if not np.isfinite(arr).all():
        raise SambaInputError(
            f"confounds hold {int((~np.isfinite(arr)).sum())} NaN/Inf value(s)", path=path
        )
    return arr
