"""The DemoNested atlas pair: a coarse and a nested fine cortical parcellation for the demo.

Both atlases are built offline from nilearn's MNI152 gray-matter template, resampled to the
requested isotropic grid. They are *demo* atlases (named ``DemoNested``): k-means clusters of
cortical gray-matter voxel coordinates, not a published parcellation.

Construction (deterministic for a seed):

1. Threshold the gray-matter template and keep a cortex-like subset (cerebellum, brainstem and
   deep gray matter are excluded by coordinate boxes in MNI mm).
2. Split by hemisphere (x < 0: LH) and cluster each hemisphere's voxel coordinates with a seeded
   k-means into the coarse parcels.
3. Assign every coarse parcel to one of the 7 networks (Vis ... Default) by the distance of its
   centroid to network prototype coordinates; an optimal assignment (Hungarian) first gives every
   network at least one parcel per hemisphere.
4. Split every coarse parcel into fine parcels (k-means again), so that every fine parcel lies in
   exactly one coarse parcel. The number of fine parcels per coarse parcel is proportional to its
   size (largest remainder), at least one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from samba_pipeline.errors import SambaUsageError

LOGGER = logging.getLogger("samba_pipeline.simulate")

ATLAS_NAME = "DemoNested"
TEMPLATE = "MNI152NLin2009cAsym"
NAME_PREFIX = "DemoNetworks"
NETWORKS = ("Vis", "SomMot", "DorsAttn", "SalVentAttn", "Limbic", "Cont", "Default")
HEMISPHERES = ("LH", "RH")

#: Left-hemisphere prototype coordinates (MNI mm) of the 7 networks, loosely after the
#: well-known large-scale network topography; the right hemisphere uses the mirror image.
NETWORK_PROTOTYPES_LH: dict[str, tuple[tuple[float, float, float], ...]] = {
    "Vis": ((-15, -90, 5), (-30, -80, -10), (-10, -70, 10)),
    "SomMot": ((-40, -22, 55), (-55, -15, 20), (-8, -20, 65)),
    "DorsAttn": ((-30, -55, 55), (-48, -65, 0), (-28, -5, 55)),
    "SalVentAttn": ((-38, 5, 5), (-55, -40, 30), (-5, 20, 40)),
    "Limbic": ((-25, 20, -20), (-45, 5, -35)),
    "Cont": ((-42, 35, 25), (-40, -58, 45)),
    "Default": ((-5, 50, 10), (-5, -55, 30), (-55, -20, -15), (-45, -68, 30)),
}

#: Gray-matter probability threshold of the template used for the cortical mask.
GM_THRESHOLD = 0.5


@dataclass
class DemoAtlas:
    """The atlas pair and the tissue maps of the demo grid (all on one grid)."""

    resolution_mm: int
    affine: np.ndarray
    shape: tuple[int, int, int]
    gm: np.ndarray  # gray-matter probability, float32
    wm: np.ndarray  # white-matter probability, float32
    csf: np.ndarray  # cerebrospinal-fluid "probability" (brain mask minus GM and WM)
    brain_mask: np.ndarray  # bool
    coarse: np.ndarray  # int16 labels, 0 = background
    fine: np.ndarray  # int16 labels, 0 = background
    coarse_table: pd.DataFrame
    fine_table: pd.DataFrame
    fine_to_coarse: np.ndarray  # (n_fine,) 0-based coarse index of each fine parcel

    @property
    def n_coarse(self) -> int:
        return len(self.coarse_table)

    @property
    def n_fine(self) -> int:
        return len(self.fine_table)

    @property
    def res_label(self) -> str:
        return f"{self.resolution_mm:02d}"

    def voxel_mm(self, mask: np.ndarray) -> np.ndarray:
        """MNI mm coordinates (n, 3) of the voxels in ``mask`` (C order)."""
        ijk = np.argwhere(mask)
        return nib.affines.apply_affine(self.affine, ijk)

    def image(self, data: np.ndarray, dtype=np.int16) -> nib.Nifti1Image:
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), self.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_qform(self.affine, code=4)
        img.header.set_sform(self.affine, code=4)
        return img

    def file_stem(self, n_parcels: int) -> str:
        return (
            f"tpl-{TEMPLATE}_res-{self.res_label}_atlas-{ATLAS_NAME}_scale-{n_parcels}_dseg"
        )


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, n_iter: int = 60) -> np.ndarray:
    """Seeded k-means (k-means++ initialisation, Lloyd iterations); returns labels 0..k-1.

    Every cluster is non-empty: an emptied cluster is re-seeded at the point farthest from its
    centre. Deterministic for a given ``rng`` state.
    """
    n = len(points)
    if k < 1 or k > n:
        raise ValueError(f"cannot make {k} clusters from {n} points")
    points = np.asarray(points, dtype=np.float64)
    centres = np.empty((k, points.shape[1]))
    centres[0] = points[rng.integers(n)]
    d2 = ((points - centres[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        if total <= 0:
            idx = rng.integers(n)
        else:
            idx = rng.choice(n, p=d2 / total)
        centres[j] = points[idx]
        d2 = np.minimum(d2, ((points - centres[j]) ** 2).sum(1))
    labels = np.full(n, -1)
    sq = (points**2).sum(1)[:, None]
    for _ in range(n_iter):
        dist = sq - 2.0 * points @ centres.T + (centres**2).sum(1)[None, :]
        new = dist.argmin(1)
        counts = np.bincount(new, minlength=k)
        for j in np.flatnonzero(counts == 0):
            far = dist[np.arange(n), new].argmax()
            new[far] = j
            dist[far] = np.inf
            dist[far, j] = 0.0
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k).astype(float)
        for d in range(points.shape[1]):
            centres[:, d] = np.bincount(labels, weights=points[:, d], minlength=k) / counts
    return labels


def _largest_remainder(sizes: np.ndarray, total: int, minimum: int = 1) -> np.ndarray:
    """Split ``total`` into integer shares proportional to ``sizes``, each >= ``minimum``."""
    sizes = np.asarray(sizes, dtype=float)
    n = len(sizes)
    base = np.full(n, minimum)
    rest = total - base.sum()
    if rest < 0:
        raise ValueError("total too small")
    quota = sizes / sizes.sum() * rest
    share = np.floor(quota).astype(int)
    remainder = quota - share
    left = rest - share.sum()
    order = np.lexsort((np.arange(n), -remainder))
    share[order[:left]] += 1
    out = base + share
    # never ask for more parcels than voxels
    return np.minimum(out, sizes.astype(int))


def _cortex_mask(gm: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Gray matter above threshold, without cerebellum, brainstem and deep gray matter."""
    mask = (gm > GM_THRESHOLD) & brain
    ijk = np.argwhere(mask)
    x, y, z = nib.affines.apply_affine(affine, ijk).T
    cerebellum = (y < -38) & (z < -18)
    brainstem = (np.abs(x) < 14) & (y < -10) & (y > -45) & (z < -5)
    deep = (np.abs(x) < 30) & (y > -35) & (y < 25) & (z > -14) & (z < 22)
    mesial_temporal = (np.abs(x) > 14) & (np.abs(x) < 36) & (y > -42) & (y < 2) & (z < -4) & (z > -32)
    drop = cerebellum | brainstem | deep | mesial_temporal
    keep = ijk[~drop]
    out = np.zeros_like(mask)
    out[tuple(keep.T)] = True
    return out


def _assign_networks(centroids_mm: np.ndarray, hemi: str) -> np.ndarray:
    """Network index (0..6) for each coarse parcel of one hemisphere (see module doc)."""
    sign = -1.0 if hemi == "LH" else 1.0
    cost = np.empty((len(centroids_mm), len(NETWORKS)))
    for j, net in enumerate(NETWORKS):
        protos = np.array(NETWORK_PROTOTYPES_LH[net], dtype=float)
        protos[:, 0] = sign * np.abs(protos[:, 0])
        d = np.linalg.norm(centroids_mm[:, None, :] - protos[None, :, :], axis=-1)
        cost[:, j] = d.min(1)
    nets = cost.argmin(1)
    rows, cols = linear_sum_assignment(cost)
    nets[rows] = cols
    return nets


def build_demo_atlas(
    resolution_mm: float = 4.0,
    coarse_parcels: int = 20,
    fine_parcels: int = 50,
    seed: int = 42,
) -> DemoAtlas:
    """Build the DemoNested atlas pair on the MNI152 grid of ``resolution_mm`` (see module doc)."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_wm_template,
    )

    res = _check_resolution(resolution_mm)
    n_lh = (coarse_parcels + 1) // 2
    n_rh = coarse_parcels // 2
    if n_rh < len(NETWORKS):
        raise SambaUsageError(
            f"--coarse-parcels must be at least {2 * len(NETWORKS)} (7 networks per hemisphere), "
            f"got {coarse_parcels}"
        )
    if fine_parcels <= coarse_parcels:
        raise SambaUsageError(
            f"--fine-parcels ({fine_parcels}) must be larger than --coarse-parcels ({coarse_parcels})"
        )

    LOGGER.info("Building the DemoNested atlas pair at %d mm (%d/%d parcels)",
                res, coarse_parcels, fine_parcels)
    gm_img = load_mni152_gm_template(resolution=res)
    wm_img = load_mni152_wm_template(resolution=res)
    bm_img = load_mni152_brain_mask(resolution=res)
    affine = gm_img.affine.copy()
    gm = np.clip(np.asarray(gm_img.get_fdata(), dtype=np.float32), 0, 1)
    wm = np.clip(np.asarray(wm_img.get_fdata(), dtype=np.float32), 0, 1)
    brain = np.asarray(bm_img.get_fdata()) > 0
    brain |= (gm + wm) > 0.5
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    gm = np.where(brain, gm, 0.0).astype(np.float32)
    wm = np.where(brain, wm, 0.0).astype(np.float32)

    cortex = _cortex_mask(gm, brain, affine)
    ijk = np.argwhere(cortex)
    xyz = nib.affines.apply_affine(affine, ijk)
    if len(xyz) < fine_parcels:
        raise SambaUsageError(
            f"the {res} mm grid has only {len(xyz)} cortical voxels, fewer than "
            f"--fine-parcels {fine_parcels}"
        )
    rng = np.random.default_rng([seed, 7001])

    # --- coarse parcels per hemisphere -----------------------------------------------------
    coarse_rows = []  # (hemi, network index, centroid y, voxel indices)
    for hemi, n_h in (("LH", n_lh), ("RH", n_rh)):
        sel = np.flatnonzero(xyz[:, 0] < 0) if hemi == "LH" else np.flatnonzero(xyz[:, 0] >= 0)
        labels = kmeans(xyz[sel], n_h, rng)
        centroids = np.array([xyz[sel[labels == j]].mean(0) for j in range(n_h)])
        nets = _assign_networks(centroids, hemi)
        for j in range(n_h):
            coarse_rows.append((hemi, int(nets[j]), float(centroids[j, 1]), sel[labels == j]))
    # Schaefer-like order: LH then RH, network order, posterior to anterior
    coarse_rows.sort(key=lambda r: (HEMISPHERES.index(r[0]), r[1], r[2]))

    coarse = np.zeros(gm.shape, dtype=np.int16)
    coarse_records = []
    counters: dict[str, int] = {}
    for idx, (hemi, net, _, vox) in enumerate(coarse_rows, start=1):
        region = f"{hemi}_{NETWORKS[net]}"
        counters[region] = counters.get(region, 0) + 1
        coarse[tuple(ijk[vox].T)] = idx
        coarse_records.append(
            {
                "index": idx,
                "name": f"{NAME_PREFIX}_{region}_{counters[region]}",
                "network": NETWORKS[net],
                "hemisphere": hemi,
                "region": region,
            }
        )
    coarse_table = pd.DataFrame(coarse_records, columns=["index", "name", "network", "hemisphere", "region"])

    # --- nested fine parcels --------------------------------------------------------------------
    sizes = np.array([len(r[3]) for r in coarse_rows])
    n_split = _largest_remainder(sizes, fine_parcels)
    if n_split.sum() != fine_parcels:  # only when a parcel has fewer voxels than its share
        raise SambaUsageError(
            f"cannot split {coarse_parcels} coarse parcels into {fine_parcels} fine parcels "
            f"at {res} mm (too few voxels)"
        )
    fine = np.zeros(gm.shape, dtype=np.int16)
    fine_records = []
    fine_to_coarse = []
    fidx = 0
    counters = {}
    for c, (hemi, net, _, vox) in enumerate(coarse_rows):
        pts = xyz[vox]
        k = int(n_split[c])
        labels = kmeans(pts, k, rng) if k > 1 else np.zeros(len(pts), dtype=int)
        cy = np.array([pts[labels == j, 1].mean() for j in range(k)])
        region = f"{hemi}_{NETWORKS[net]}"
        for j in np.argsort(cy, kind="stable"):
            fidx += 1
            counters[region] = counters.get(region, 0) + 1
            fine[tuple(ijk[vox[labels == j]].T)] = fidx
            fine_records.append(
                {
                    "index": fidx,
                    "name": f"{NAME_PREFIX}_{region}_{counters[region]}",
                    "network": NETWORKS[net],
                    "hemisphere": hemi,
                    "region": region,
                }
            )
            fine_to_coarse.append(c)
    fine_table = pd.DataFrame(fine_records, columns=["index", "name", "network", "hemisphere", "region"])
    LOGGER.info("DemoNested: %d cortical voxels, %d coarse and %d fine parcels",
                len(xyz), len(coarse_table), len(fine_table))
    return DemoAtlas(
        resolution_mm=res,
        affine=affine,
        shape=tuple(int(s) for s in gm.shape),
        gm=gm,
        wm=wm,
        csf=csf,
        brain_mask=brain,
        coarse=coarse,
        fine=fine,
        coarse_table=coarse_table,
        fine_table=fine_table,
        fine_to_coarse=np.asarray(fine_to_coarse, dtype=np.int64),
    )


def _check_resolution(resolution_mm: float) -> int:
    res = float(resolution_mm)
    if res <= 0 or abs(res - round(res)) > 1e-9 or not 1 <= round(res) <= 9:
        raise SambaUsageError(
            f"--resolution-mm must be a whole number of millimetres between 1 and 9, got {resolution_mm}"
        )
    return round(res)
