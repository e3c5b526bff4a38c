"""Template head models for EEG/MEG source space: fsaverage BEMs, or the sphere fallback.

``head_model`` (EphysSettings) picks the conductor model of :mod:`samba_pipeline.ephys.source`:

* ``"sphere"``: the 3-shell sphere fitted to the head digitisation (always available).
* ``"bem"``: a boundary-element model of fsaverage (MNE's ``make_bem_solution``):

  - **MEG only**: a single-shell (inner skull, 0.3 S/m) BEM made from the inner-skull surface
    MNE ships (``mne/data/fsaverage/fsaverage-inner_skull-bem.fif``, an ico-5 mesh, used
    downsampled to ico-4 = 5120 triangles as in MNE's standard MEG BEM); the solution is
    computed here (a few seconds) and cached per process. Always available.
  - **EEG (or EEG + MEG)**: FreeSurfer's 3-layer solution
    ``fsaverage/bem/fsaverage-5120-5120-5120-bem-sol.fif`` of a subjects dir: the
    ``subjects_dir`` ephys key, else ``$SUBJECTS_DIR``, else MNE's own fsaverage download
    (``<MNE_DATA>/MNE-fsaverage-data``, present only if ``mne.datasets.fetch_fsaverage`` ran
    before: nothing is downloaded). TemplateFlow's ``tpl-fsaverage`` has cortical surfaces
    only (no skull or scalp), so it offers no BEM. ``bem_file`` names a BEM solution
    explicitly (fsaverage MRI coordinates, any number of layers).
* ``"auto"`` (default): the BEM when its files are there, else the sphere, with the reason
  logged and recorded in the report.

Coordinates (BEM): the atlas is in MNI152NLin2009cAsym (mm); fsaverage's MRI (surface RAS)
coordinates are MNI305 (its talairach transform is the identity). Source positions go
MNI152 -> MNI305 by the inverse of FreeSurfer's MNI305 -> MNI152 affine (FreeSurfer wiki,
"CoordinateSystems", ``mni152.register.dat``; ~1.5 mm shift). That affine is for FSL's linear
MNI152; the remaining difference to the nonlinear 2009c template is a few mm at the cortex,
well below the 8 mm source grid. MNE's standard montages (the Colin27 10-05 template used for
co-registration) carry fsaverage's fiducials, so the template -> head transforms of
:func:`samba_pipeline.ephys.source.template_to_head` are fsaverage MRI -> head transforms.

Source points must lie inside the inner skull for a BEM forward model (MNE drops the others);
:func:`points_inside` (generalised winding number, vectorised) finds those outside or closer
than ``mindist`` to it, and :func:`push_inside` moves them towards the surface's centroid
until they are inside (reported: how many moved, and how far).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mne
import numpy as np

from samba_pipeline.errors import SambaInputError, SambaUsageError

LOGGER = logging.getLogger(__name__)

HEAD_MODELS = ("auto", "sphere", "bem")
MNE_FSAVERAGE_DIR = Path(mne.__file__).parent / "data" / "fsaverage"
INNER_SKULL_FILE = MNE_FSAVERAGE_DIR / "fsaverage-inner_skull-bem.fif"
FSAVERAGE_BEM_SOL = "fsaverage-5120-5120-5120-bem-sol.fif"
#: single-shell MEG BEM: mesh resolution (ico-4: 5120 triangles) and brain conductivity (S/m)
MEG_BEM_ICO = 4
MEG_BEM_CONDUCTIVITY = (0.3,)
#: MNI305 (fsaverage MRI) -> MNI152, mm (FreeSurfer's mni152.register.dat)
MNI305_TO_MNI152 = np.array([[0.9975, -0.0073, 0.0176, -0.0429],
                             [0.0146, 1.0009, -0.0024, 1.5496],
                             [-0.0130, -0.0093, 0.9971, 1.1840],
                             [0.0, 0.0, 0.0, 1.0]])
MNI152_TO_MNI305 = np.linalg.inv(MNI305_TO_MNI152)


def mni152_to_fsaverage(pos_mm: np.ndarray) -> np.ndarray:
    """MNI152 positions (mm) -> fsaverage MRI coordinates (MNI305, m)."""
    return mne.transforms.apply_trans(MNI152_TO_MNI305, np.asarray(pos_mm, dtype=float)) / 1000.0


# --------------------------------------------------------------------------------------------
# point in a closed mesh
# --------------------------------------------------------------------------------------------


def winding_number(points: np.ndarray, rr: np.ndarray, tris: np.ndarray,
                   chunk: int | None = None) -> np.ndarray:
    """Generalised winding number of a closed triangle mesh at ``points`` (n, 3).

    The sum of the signed solid angles of the triangles seen from each point (Van Oosterom &
    Strackee 1983), over 4 pi: +-1 inside a closed, consistently oriented mesh (the sign is
    the orientation), 0 outside, and robust to small holes and self-touching triangles
    (Jacobson et al. 2013). With a = A - p etc. for a triangle ABC, every term of the formula
    expands into per-triangle constants and products with p, so each chunk of points costs a
    few (n_points x n_triangles) matrix products; chunks of ``chunk`` points (by default
    about 2**17 point-triangle pairs, which keeps the work arrays in cache: 5x faster than
    large chunks).
    """
    points = np.atleast_2d(np.asarray(points, dtype=float))
    tris = np.asarray(tris)
    chunk = chunk or max(4, 2 ** 17 // max(len(tris), 1))
    centre = rr.mean(axis=0)
    v = (np.asarray(rr, dtype=float) - centre)[np.asarray(tris)]  # (n_tri, 3, 3)
    a0, b0, c0 = v[:, 0], v[:, 1], v[:, 2]
    det0 = np.einsum("tk,tk->t", a0, np.cross(b0, c0))
    cross_sum = np.cross(a0, b0) + np.cross(b0, c0) + np.cross(c0, a0)
    # det(a, b, c) = det(A, B, C) - p . (AxB + BxC + CxA);  a.b = A.B - p.(A+B) + |p|^2
    pairs = [(a0, b0), (a0, c0), (b0, c0)]
    dots0 = [np.einsum("tk,tk->t", x, y) for x, y in pairs]
    sums = [x + y for x, y in pairs]
    verts = np.asarray(rr, dtype=float) - centre
    out = np.empty(len(points))
    for start in range(0, len(points), chunk):
        p = points[start:start + chunk] - centre
        p2 = np.einsum("pk,pk->p", p, p)[:, None]
        dist = np.sqrt(np.maximum(p2 - 2 * p @ verts.T + np.einsum("vk,vk->v", verts, verts), 0))
        la, lb, lc = (dist[:, tris[:, k]] for k in range(3))
        ab, ac, bc = (d0[None] - p @ sm.T + p2 for d0, sm in zip(dots0, sums))
        num = det0[None] - p @ cross_sum.T
        den = la * lb * lc + ab * lc + ac * lb + bc * la
        out[start:start + chunk] = 2.0 * np.arctan2(num, den).sum(axis=1) / (4.0 * np.pi)
    return out


def points_inside(points: np.ndarray, rr: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """True for the ``points`` inside the closed mesh (|winding number| > 1/2)."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    inside = np.zeros(len(points), dtype=bool)
    centre = rr.mean(axis=0)
    # outside the ball around the centre that holds every vertex: outside the mesh
    maybe = np.linalg.norm(points - centre, axis=1) <= np.linalg.norm(rr - centre, axis=1).max()
    if maybe.any():
        inside[maybe] = np.abs(winding_number(points[maybe], rr, tris)) > 0.5
    return inside


def _nearest_vertex_distance(points: np.ndarray, rr: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    return cKDTree(rr).query(points)[0]


def push_inside(points: np.ndarray, rr: np.ndarray, tris: np.ndarray, mindist: float,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Move the points outside the mesh, or nearer than ``mindist`` (m) to its vertices, along
    the line to the mesh's centroid until they are inside by that margin (steps of 1 %).

    Returns ``(points, moved)`` (a boolean mask of the points that moved).
    """
    points = np.array(points, dtype=float)
    centre = rr.mean(axis=0)

    def bad(p):
        return ~points_inside(p, rr, tris) | (_nearest_vertex_distance(p, rr) < mindist)

    todo = np.flatnonzero(bad(points))
    moved = np.zeros(len(points), dtype=bool)
    moved[todo] = True
    start = points[todo].copy()
    for factor in np.arange(0.99, 0.0, -0.01):
        if not todo.size:
            break
        points[todo] = centre + (start - centre) * factor
        still = bad(points[todo])
        todo, start = todo[still], start[still]
    if todo.size:  # cannot happen for a closed mesh around its centroid
        raise RuntimeError(f"{todo.size} source points could not be moved inside the inner skull")
    return points, moved


# --------------------------------------------------------------------------------------------
# finding and reading BEMs
# --------------------------------------------------------------------------------------------


def subjects_dir_candidates(subjects_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where an fsaverage BEM is looked for, in order (module docstring)."""
    out = []
    if subjects_dir:
        out.append(Path(subjects_dir))
    if os.environ.get("SUBJECTS_DIR"):
        out.append(Path(os.environ["SUBJECTS_DIR"]))
    mne_data = mne.get_config("MNE_DATA") or str(Path("~/mne_data").expanduser())
    out.append(Path(mne_data) / "MNE-fsaverage-data")
    return list(dict.fromkeys(out))


def find_fsaverage_bem(subjects_dir: str | os.PathLike | None = None) -> tuple[Path | None, list[str]]:
    """``(path of fsaverage's 3-layer BEM solution or None, the places searched)``."""
    searched = []
    for root in subjects_dir_candidates(subjects_dir):
        path = root / "fsaverage" / "bem" / FSAVERAGE_BEM_SOL
        searched.append(str(path))
        if path.is_file():
            return path, searched
    return None, searched


def read_bem_solution(path: str | os.PathLike) -> mne.bem.ConductorModel:
    """A BEM solution file, or a :class:`SambaInputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise SambaInputError("BEM solution file not found", path=path)
    try:
        with mne.utils.use_log_level("error"):
            bem = mne.read_bem_solution(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise SambaInputError(f"cannot read the BEM solution: {exc}", path=path) from None
    if not bem.get("surfs") or bem.get("solution") is None:
        raise SambaInputError("the file holds no BEM solution", path=path)
    if inner_skull(bem)["coord_frame"] != mne.io.constants.FIFF.FIFFV_COORD_MRI:
        raise SambaInputError("the BEM surfaces are not in MRI coordinates", path=path)
    return bem


def inner_skull(bem: mne.bem.ConductorModel) -> dict:
    """The inner-skull (brain) surface of a BEM."""
    for surf in bem["surfs"]:
        if surf["id"] == mne.io.constants.FIFF.FIFFV_BEM_SURF_ID_BRAIN:
            return surf
    return bem["surfs"][-1]  # innermost layer


@functools.lru_cache(maxsize=4)
def _meg_bem_cached(scale: float) -> mne.bem.ConductorModel:
    surf = mne.read_bem_surfaces(INNER_SKULL_FILE, verbose="error")[0]
    with tempfile.TemporaryDirectory(prefix="samba_bem_") as tmp:
        bem_dir = Path(tmp) / "fsaverage" / "bem"
        bem_dir.mkdir(parents=True)
        mne.write_surface(str(bem_dir / "inner_skull.surf"), surf["rr"] * 1000.0 * scale,
                          surf["tris"])
        with mne.utils.use_log_level("error"):
            model = mne.make_bem_model("fsaverage", ico=MEG_BEM_ICO,
                                       conductivity=MEG_BEM_CONDUCTIVITY, subjects_dir=tmp)
            return mne.make_bem_solution(model)


def meg_single_shell_bem(scale: float = 1.0) -> mne.bem.ConductorModel:
    """Single-shell BEM solution of MNE's fsaverage inner skull, scaled by ``scale``."""
    return _meg_bem_cached(round(float(scale), 3))


# --------------------------------------------------------------------------------------------
# the choice
# --------------------------------------------------------------------------------------------


@dataclass
class HeadModelChoice:
    kind: str  # "sphere" or "bem"
    bem: mne.bem.ConductorModel | None = None
    bem_file: str | None = None  # None: the single shell made here from MNE's inner skull
    scalable: bool = False  # the BEM is made here, so it can follow the head's size
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def choose_head_model(head_model: str = "auto", *, eeg: bool, subjects_dir=None,
                      bem_file=None) -> HeadModelChoice:
    """The head model to use (module docstring); ``eeg``: the recording has EEG channels."""
    if head_model not in HEAD_MODELS:
        raise SambaUsageError(f"head_model={head_model!r}; choose from {list(HEAD_MODELS)}")
    if head_model == "sphere":
        return HeadModelChoice("sphere", reason="head_model='sphere'")
    if bem_file:
        bem = read_bem_solution(bem_file)
        if eeg and len(bem["surfs"]) < 3:
            raise SambaInputError(f"EEG needs a 3-layer BEM (scalp, skull, brain); this one has "
                                  f"{len(bem['surfs'])} layer(s)", path=bem_file)
        return HeadModelChoice("bem", bem=bem, bem_file=str(bem_file), reason="bem_file")
    if not eeg:
        if INNER_SKULL_FILE.is_file():
            return HeadModelChoice("bem", scalable=True,
                                   reason="MEG: single shell of MNE's fsaverage inner skull")
        reason = f"MNE's fsaverage inner skull is missing ({INNER_SKULL_FILE})"
    else:
        path, searched = find_fsaverage_bem(subjects_dir)
        if path is not None:
            bem = read_bem_solution(path)
            if len(bem["surfs"]) < 3:
                raise SambaInputError(f"EEG needs a 3-layer BEM; this one has "
                                      f"{len(bem['surfs'])} layer(s)", path=path)
            return HeadModelChoice("bem", bem=bem, bem_file=str(path),
                                   reason="fsaverage 3-layer BEM of the subjects dir")
        reason = ("no fsaverage 3-layer BEM solution (looked for " + ", ".join(searched)
                  + "; TemplateFlow's fsaverage has no skull or scalp surfaces)")
    if head_model == "bem":
        raise SambaInputError(f"head_model='bem' but {reason}")
    LOGGER.info("head_model='auto': using the 3-shell sphere: %s", reason)
    return HeadModelChoice("sphere", reason=reason)


__all__ = ["HEAD_MODELS", "HeadModelChoice", "choose_head_model", "find_fsaverage_bem",
           "meg_single_shell_bem", "mni152_to_fsaverage", "points_inside", "push_inside",
           "read_bem_solution", "winding_number"]
