"""Functional-connectivity graphs and the fine-to-coarse region map.

* :func:`cosine_graph`: cosine similarity of (mean-centred) node time series, the seed paper's
  W^X / W^Y graphs. Centred cosine similarity is the Pearson correlation.
* :func:`region_map`: which coarse (ephys) parcels feed each fine (fMRI) parcel, namely those of
  the same anatomical region.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pandas as pd

from samba_pipeline.errors import SambaInputError, SambaMissingInputError

LOGGER = logging.getLogger(__name__)

#: Schaefer-style parcel names: ``<k>Networks_<LH|RH>_<Network>_...``.
SCHAEFER_NAME = re.compile(r"^[A-Za-z0-9]*Networks_(LH|RH)_([A-Za-z0-9]+)(?:_|$)")

#: A column whose centred norm is below this fraction of its raw norm counts as constant.
ZERO_VARIANCE_RTOL = 1e-10


def cosine_graph(timeseries, *, center: bool = True) -> np.ndarray:
    """Cosine similarity between the columns of ``timeseries`` [n_times, n_nodes].

    With ``center=True`` (default) each column's mean is removed first, so the result equals
    the Pearson correlation matrix. A column holding any NaN/Inf gives a NaN row and column; a
    constant (zero-variance, after centring) or all-zero column has similarity 0 with every
    other node. The diagonal is 1 for every node without NaN (constant nodes included).
    """
    x = np.asarray(timeseries, dtype=float)
    if x.ndim != 2:
        raise SambaInputError(f"time series must be 2-D [time x node], got shape {x.shape}")
    if x.shape[0] < 2:
        raise SambaInputError(f"time series need at least 2 samples, got {x.shape[0]}")
    valid = np.isfinite(x).all(axis=0)
    x = np.where(valid, x, 0.0)
    raw_norm = np.linalg.norm(x, axis=0)
    if center:
        x = x - x.mean(axis=0)
    norm = np.linalg.norm(x, axis=0)
    nonconst = norm > ZERO_VARIANCE_RTOL * raw_norm
    nonconst &= norm > 0
    unit = np.divide(x, norm, out=np.zeros_like(x), where=nonconst)
    graph = np.clip(unit.T @ unit, -1.0, 1.0)
    np.fill_diagonal(graph, 1.0)
    graph[~valid, :] = np.nan
    graph[:, ~valid] = np.nan
    return graph


def region_map(
    coarse_labels: pd.DataFrame,
    fine_labels: pd.DataFrame,
    *,
    coarse_img=None,
    fine_img=None,
) -> pd.DataFrame:
    """Binary map [n_fine x n_coarse]: 1 where coarse parcel j feeds fine parcel i.

    A fine parcel is fed by every coarse parcel of its region. The region comes, in order of
    preference, from

    1. a ``region`` column present in both tables;
    2. Schaefer-style names ``<k>Networks_<LH|RH>_<Network>_...`` (region = hemisphere +
       network);
    3. spatial overlap of the two label images (needs ``coarse_img`` and ``fine_img``): the
       coarse image is resampled onto the fine grid (nearest) and each fine parcel is mapped to
       the coarse parcel(s) sharing the most voxels with it. This also fills in fine parcels
       that 1 or 2 left without a coarse parcel.

    Index: fine names; columns: coarse names; dtype int8. ``attrs["method"]`` records which
    rules were used (e.g. ``"names+overlap"``).
    """
    coarse = _check_table(coarse_labels, "coarse", coarse_img)
    fine = _check_table(fine_labels, "fine", fine_img)
    coarse_names = coarse["name"].astype(str).to_numpy()
    fine_names = fine["name"].astype(str).to_numpy()
    mapping = np.zeros((len(fine), len(coarse)), dtype=bool)
    methods = []

    if "region" in coarse.columns and "region" in fine.columns:
        c_reg = coarse["region"].astype("string").to_numpy(dtype=object, na_value=None)
        f_reg = fine["region"].astype("string").to_numpy(dtype=object, na_value=None)
        methods.append("region")
    else:
        c_reg = _schaefer_regions(coarse_names)
        f_reg = _schaefer_regions(fine_names)
        if any(r is not None for r in c_reg) and any(r is not None for r in f_reg):
            methods.append("names")
    if methods:
        c_ok = np.array([r is not None for r in c_reg])
        f_ok = np.array([r is not None for r in f_reg])
        # Factorise the union of region strings, then compare codes (vectorised).
        codes, _ = pd.factorize(pd.Series(list(f_reg) + list(c_reg), dtype=object))
        f_code, c_code = codes[: len(f_reg)], codes[len(f_reg) :]
        mapping = (f_code[:, None] == c_code[None, :]) & f_ok[:, None] & c_ok[None, :]

    unmatched = ~mapping.any(axis=1)
    if unmatched.any() and coarse_img is not None and fine_img is not None:
        overlap = _overlap_map(coarse, fine, coarse_img, fine_img)
        mapping[unmatched] = overlap[unmatched]
        methods.append("overlap")
        unmatched = ~mapping.any(axis=1)
    if unmatched.any():
        missing = fine_names[unmatched].tolist()
        how = " and ".join(methods) if methods else "no usable region column, names or images"
        raise SambaInputError(
            f"{len(missing)} fine parcel(s) have no coarse parcel of the same region (via "
            f"{how}): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""),
            path=_img_path(fine_img) or fine.attrs.get("path"),
        )
    out = pd.DataFrame(mapping.astype(np.int8), index=fine_names, columns=coarse_names)
    out.index.name = "fine"
    out.columns.name = "coarse"
    out.attrs["method"] = "+".join(methods)
    return out


def _schaefer_regions(names) -> list[str | None]:
    out: list[str | None] = []
    for name in names:  # string parsing only; the mapping itself is vectorised
        match = SCHAEFER_NAME.match(name)
        out.append(f"{match.group(1)}_{match.group(2)}" if match else None)
    return out


def _check_table(table, which, img) -> pd.DataFrame:
    if isinstance(table, (str, os.PathLike)):
        path = os.fspath(table)
        if not os.path.isfile(path):
            raise SambaMissingInputError(f"{which} atlas label table not found", path=path)
        table = pd.read_csv(path, sep="\t")
        table.attrs["path"] = path
    if not isinstance(table, pd.DataFrame) or "name" not in table.columns:
        raise SambaInputError(
            f"{which} atlas label table must be a DataFrame with a 'name' column",
            path=getattr(table, "attrs", {}).get("path") or _img_path(img),
        )
    if table.empty:
        raise SambaInputError(f"{which} atlas label table has no rows", path=_img_path(img))
    dup = table["name"][table["name"].duplicated()].astype(str).tolist()
    if dup:
        raise SambaInputError(
            f"{which} atlas label table repeats name(s) {', '.join(dup[:10])}",
            path=table.attrs.get("path") or _img_path(img),
        )
    return table


def _img_path(img):
    if img is None:
        return None
    if isinstance(img, (str, os.PathLike)):
        return os.fspath(img)
    get = getattr(img, "get_filename", None)
    return get() if get else None


def _load_labels_img(img, which):
    import nibabel as nib

    path = _img_path(img)
    if isinstance(img, (str, os.PathLike)):
        if not os.path.isfile(path):
            raise SambaMissingInputError(f"{which} atlas image not found", path=path)
        img = nib.load(path)
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine)
    if len(img.shape) != 3:
        raise SambaInputError(f"{which} atlas image is not 3-D (shape {img.shape})", path=path)
    return img, path


def _overlap_map(coarse, fine, coarse_img, fine_img) -> np.ndarray:
    """[n_fine x n_coarse] bool: coarse parcel(s) with the largest voxel overlap per fine parcel."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    c_img, c_path = _load_labels_img(coarse_img, "coarse")
    f_img, f_path = _load_labels_img(fine_img, "fine")
    for which, table, path in (("coarse", coarse, c_path), ("fine", fine, f_path)):
        if "index" not in table.columns:
            raise SambaInputError(
                f"{which} atlas label table needs an 'index' column to use its image",
                path=path,
            )
    f_data = np.rint(np.asarray(f_img.dataobj)).astype(np.int64)
    same = c_img.shape == f_img.shape and np.allclose(c_img.affine, f_img.affine, atol=1e-4)
    if not same:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c_img = resample_to_img(
                nib.Nifti1Image(np.asarray(c_img.dataobj), c_img.affine),
                f_img,
                interpolation="nearest",
                force_resample=True,
                copy_header=True,
            )
    c_data = np.rint(np.asarray(c_img.dataobj)).astype(np.int64)

    f_pos = _positions(f_data, fine["index"].to_numpy(dtype=np.int64))
    c_pos = _positions(c_data, coarse["index"].to_numpy(dtype=np.int64))
    both = (f_pos >= 0) & (c_pos >= 0)
    n_f, n_c = len(fine), len(coarse)
    counts = np.bincount(f_pos[both] * n_c + c_pos[both], minlength=n_f * n_c).reshape(n_f, n_c)
    best = counts.max(axis=1, keepdims=True)
    return (counts == best) & (best > 0)


def _positions(data, ids) -> np.ndarray:
    """Row position in the table of each voxel's label; -1 for background/unknown labels."""
    order = np.argsort(ids)
    sorted_ids = ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, data), 0, len(ids) - 1)
    hit = (sorted_ids[pos] == data) & (data != 0)
    return np.where(hit, order[pos], -1)
