"""Training data: aligned EEG/MEG + fMRI runs, z-scoring, windows and the data dimensions.

Three layers, each usable on its own:

* :class:`RunData` — one aligned run held in memory (``ephys`` ``[n_channels, n_samples]`` and
  ``fmri`` ``[n_parcels, n_volumes]`` on one timeline, sample 0 = first kept fMRI volume), with
  ``source``/``target`` views for the translation direction. :func:`load_runs` reads them from
  the participant-level derivatives (docs/dataflow.md, section 2); :meth:`RunData.from_arrays`
  builds one from plain arrays.
* :class:`Normalizer` — per-run z-scoring of every channel / parcel, with statistics computed
  only on the volumes covered by *training* windows (runs without training data, e.g. withheld
  subjects, use the statistics pooled over the training runs).
* :class:`WindowDataset` — a :class:`torch.utils.data.Dataset` of aligned windows cut from the
  segments of a :class:`~samba_pipeline.training.splits.Split`; :func:`collate_windows` turns a
  list of items into a :class:`~samba_pipeline.models.base.Batch`.

All windows sit on the fMRI volume grid: a window of ``window_s`` seconds holds
``n = floor(window_s / TR + 1/2)`` volumes (so 15 s at TR 2 s is 8 volumes = 16 s, exactly as
``windows.tsv`` counts it) and ``round(n * TR * sfreq)`` EEG/MEG samples starting at
``to_sample(onset)``. :func:`make_dims` reports that snapped length as ``DataDims.window_s``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from samba_pipeline.align import to_sample
from samba_pipeline.bids.derivatives import read_tsv
from samba_pipeline.errors import SambaInputError, SambaMissingInputError, SambaNoMatchError
from samba_pipeline.models.base import DIRECTIONS, Batch, DataDims

LOGGER = logging.getLogger("samba_pipeline.training")

_ENTITY = re.compile(r"(sub|ses|task|acq|run)-([a-zA-Z0-9]+)")
_ENTITY_NAMES = {"sub": "subject", "ses": "session", "task": "task", "acq": "acquisition", "run": "run"}
#: Relative tolerance for "same sampling frequency / TR" across runs.
_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """One aligned EEG/MEG-fMRI run (both series start at the first kept fMRI volume).

    ``fmri`` may hold all-NaN columns (parcels below the coverage threshold); ``fmri_valid``
    marks the finite ones. ``source``/``target`` (and their names, rates, validity and graphs)
    follow ``direction``: ``"ephys2fmri"`` = EEG/MEG -> fMRI, ``"fmri2ephys"`` the reverse.
    """

    ephys: np.ndarray
    fmri: np.ndarray
    ephys_sfreq: float
    tr: float
    ephys_names: list[str]
    fmri_names: list[str]
    direction: str = "ephys2fmri"
    subject: str = "01"
    session: str | None = None
    task: str | None = None
    acquisition: str | None = None
    run: str | None = None
    ephys_graph: np.ndarray | None = None
    fmri_graph: np.ndarray | None = None
    #: fMRI (fine) parcels x EEG/MEG (coarse) parcels, 1 where the column feeds the row.
    region_map: pd.DataFrame | None = None
    ephys_space: str = "sensor"
    files: dict[str, str] = field(default_factory=dict)
    ephys_valid: np.ndarray = field(init=False)
    fmri_valid: np.ndarray = field(init=False)

    def __post_init__(self):
        where = self.files.get("fmri") or self.files.get("ephys")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")
        self.ephys = np.asarray(self.ephys, dtype=np.float32)
        self.fmri = np.asarray(self.fmri, dtype=np.float32)
        if self.ephys.ndim != 2 or self.fmri.ndim != 2:
            raise SambaInputError("ephys and fmri must be 2-D [nodes, time] arrays", path=where)
        if len(self.ephys_names) != self.ephys.shape[0]:
            raise SambaInputError(f"{len(self.ephys_names)} EEG/MEG names for {self.ephys.shape[0]} "
                                  "channels", path=self.files.get("ephys"))
        if len(self.fmri_names) != self.fmri.shape[0]:
            raise SambaInputError(f"{len(self.fmri_names)} fMRI names for {self.fmri.shape[0]} parcels",
                                  path=self.files.get("fmri"))
        if not (self.ephys_sfreq > 0 and self.tr > 0):
            raise SambaInputError("sampling frequency and TR must be positive", path=where)
        self.ephys_names = [str(n) for n in self.ephys_names]
        self.fmri_names = [str(n) for n in self.fmri_names]
        self.ephys_valid = np.isfinite(self.ephys).all(axis=1)
        self.fmri_valid = np.isfinite(self.fmri).all(axis=1)
        partial = ~self.fmri_valid & np.isfinite(self.fmri).any(axis=1)
        if partial.any():
            LOGGER.warning("%s: %d fMRI parcel(s) with some n/a values are excluded: %s", self.key,
                           int(partial.sum()), [self.fmri_names[i] for i in np.flatnonzero(partial)][:5])
        if not self.ephys_valid.any():
            raise SambaInputError("no EEG/MEG channel without n/a values", path=self.files.get("ephys"))
        if not self.fmri_valid.any():
            raise SambaInputError("no fMRI parcel without n/a values", path=self.files.get("fmri"))
        need = to_sample(self.n_volumes * self.tr, self.ephys_sfreq)
        if self.ephys.shape[1] < need - 1:
            raise SambaInputError(
                f"EEG/MEG series has {self.ephys.shape[1]} samples but {self.n_volumes} volumes of "
                f"TR {self.tr:g} s need {need} at {self.ephys_sfreq:g} Hz; the derivatives are not "
                "aligned (re-run the participant level)", path=self.files.get("ephys"))

    @classmethod
    def from_arrays(cls, ephys, fmri, *, ephys_sfreq: float, tr: float, direction: str = "ephys2fmri",
                    ephys_names: Sequence[str] | None = None, fmri_names: Sequence[str] | None = None,
                    subject: str = "01", **kwargs) -> "RunData":
        """A run from plain arrays (numpy or torch), ``[nodes, time]`` each."""
        ephys = np.asarray(ephys.detach().cpu() if isinstance(ephys, torch.Tensor) else ephys)
        fmri = np.asarray(fmri.detach().cpu() if isinstance(fmri, torch.Tensor) else fmri)
        if ephys_names is None:
            ephys_names = [f"ch{i:03d}" for i in range(ephys.shape[0])]
        if fmri_names is None:
            fmri_names = [f"parcel{i:03d}" for i in range(fmri.shape[0])]
        return cls(ephys=ephys, fmri=fmri, ephys_sfreq=float(ephys_sfreq), tr=float(tr),
                   ephys_names=list(ephys_names), fmri_names=list(fmri_names), direction=direction,
                   subject=subject, **kwargs)

    # ---- identity -------------------------------------------------------------------------
    @property
    def entities(self) -> dict[str, str]:
        ents = {"subject": self.subject, "session": self.session, "task": self.task,
                "acquisition": self.acquisition, "run": self.run}
        return {k: v for k, v in ents.items() if v is not None}

    @property
    def key(self) -> str:
        """``sub-01[_ses-..][_task-..][_acq-..][_run-..]``."""
        short = {"subject": "sub", "session": "ses", "task": "task", "acquisition": "acq", "run": "run"}
        return "_".join(f"{short[k]}-{v}" for k, v in self.entities.items())

    # ---- timeline -------------------------------------------------------------------------
    @property
    def n_volumes(self) -> int:
        return int(self.fmri.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_volumes * self.tr

    @property
    def fmri_sfreq(self) -> float:
        return 1.0 / self.tr

    # ---- direction views ------------------------------------------------------------------
    def _pick(self, ephys_value, fmri_value, source: bool):
        ephys_is_source = self.direction == "ephys2fmri"
        return ephys_value if ephys_is_source == source else fmri_value

    source = property(lambda self: self._pick(self.ephys, self.fmri, True))
    target = property(lambda self: self._pick(self.ephys, self.fmri, False))
    source_sfreq = property(lambda self: self._pick(self.ephys_sfreq, self.fmri_sfreq, True))
    target_sfreq = property(lambda self: self._pick(self.ephys_sfreq, self.fmri_sfreq, False))
    source_names = property(lambda self: self._pick(self.ephys_names, self.fmri_names, True))
    target_names = property(lambda self: self._pick(self.ephys_names, self.fmri_names, False))
    source_valid = property(lambda self: self._pick(self.ephys_valid, self.fmri_valid, True))
    target_valid = property(lambda self: self._pick(self.ephys_valid, self.fmri_valid, False))
    source_graph = property(lambda self: self._pick(self.ephys_graph, self.fmri_graph, True))
    target_graph = property(lambda self: self._pick(self.ephys_graph, self.fmri_graph, False))

    def with_direction(self, direction: str) -> "RunData":
        """The same run seen in the other direction (arrays shared, not copied)."""
        out = RunData(ephys=self.ephys, fmri=self.fmri, ephys_sfreq=self.ephys_sfreq, tr=self.tr,
                      ephys_names=self.ephys_names, fmri_names=self.fmri_names, direction=direction,
                      subject=self.subject, session=self.session, task=self.task,
                      acquisition=self.acquisition, run=self.run, ephys_graph=self.ephys_graph,
                      fmri_graph=self.fmri_graph, region_map=self.region_map,
                      ephys_space=self.ephys_space, files=dict(self.files))
        return out


def _entities(name: str) -> dict[str, str]:
    return {_ENTITY_NAMES[k]: v for k, v in _ENTITY.findall(name)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SambaMissingInputError("missing derivative sidecar; re-run the participant level",
                                     path=path) from None
    except (OSError, ValueError) as exc:
        raise SambaInputError(f"cannot read this JSON file: {exc}", path=path) from None


def _read_table(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise SambaMissingInputError(f"missing {what}; re-run the participant level", path=path)
    try:
        table = read_tsv(path)
    except Exception as exc:  # pandas raises many types (EmptyDataError, ParserError, gzip...)
        raise SambaInputError(f"cannot read {what}: {exc}", path=path) from None
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise SambaInputError(f"{what} is empty", path=path)
    bad = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if bad:
        raise SambaInputError(f"{what} has non-numeric values in column(s) {bad[:5]}", path=path)
    return table


def _read_timeseries(path: Path, what: str) -> tuple[np.ndarray, list[str]]:
    table = _read_table(path, what)
    data = table.to_numpy(dtype=np.float32).T  # [nodes, time]
    if np.isinf(data).any():
        raise SambaInputError(f"{what} holds infinite values", path=path)
    return data, [str(c) for c in table.columns]


def _read_relmat(path: Path, names: list[str], what: str) -> np.ndarray | None:
    if not path.is_file():
        LOGGER.info("no %s at %s; the model gets no graph for it", what, path)
        return None
    try:
        table = read_tsv(path)
    except Exception as exc:
        raise SambaInputError(f"cannot read {what}: {exc}", path=path) from None
    if "Node" not in table.columns:
        raise SambaInputError(f"{what} has no 'Node' column", path=path)
    table = table.set_index("Node")
    rows, cols = [str(x) for x in table.index], [str(x) for x in table.columns]
    if rows != names or cols != names:
        raise SambaInputError(f"{what} nodes do not match the time-series columns", path=path)
    return table.to_numpy(dtype=np.float64)


def _one(paths: list[Path], what: str, where: Path, hint: str = "") -> Path:
    if not paths:
        raise SambaMissingInputError(f"no {what} found; re-run the participant level", path=where)
    if len(paths) > 1:
        names = ", ".join(p.name for p in paths)
        raise SambaInputError(f"several {what} files ({names}){hint}", path=where)
    return paths[0]


def _region_map(output_dir: Path, fmri_file: Path) -> pd.DataFrame | None:
    ents = dict(re.findall(r"(atlas|seg|scale)-([a-zA-Z0-9]+)", fmri_file.name))
    if "atlas" not in ents:
        return None
    name = "_".join(f"{k}-{ents[k]}" for k in ("atlas", "seg", "scale") if k in ents)
    path = output_dir / f"{name}_stat-regionmap_relmat.tsv"
    if not path.is_file():
        return None
    try:
        table = read_tsv(path).set_index("Node")
    except Exception as exc:
        raise SambaInputError(f"cannot read the region map: {exc}", path=path) from None
    table.index = [str(x) for x in table.index]
    table.columns = [str(x) for x in table.columns]
    table.attrs["path"] = str(path)
    return table


def load_runs(output_dir, subjects: Iterable[str] | None = None, direction: str = "ephys2fmri", *,
              sessions: Iterable[str] | None = None, tasks: Iterable[str] | None = None,
              fmri_atlas: str | None = None) -> list[RunData]:
    """Read every aligned run of the participant-level derivatives in ``output_dir``.

    A run is found through its ``*_alignment.json``; beside it the function reads the EEG/MEG
    ``desc-preproc_timeseries.tsv.gz`` (+ JSON ``SamplingFrequency``), the fMRI
    ``stat-mean_timeseries.tsv`` (+ JSON ``RepetitionTime``), both cosine graphs (optional) and
    the top-level region map (optional). ``subjects``/``sessions``/``tasks`` are labels without
    prefix. When the output holds fMRI time series of several atlases/spaces, ``fmri_atlas``
    (a substring of the file name, e.g. ``"atlas-Schaefer2018_seg-7n_scale-400"``) picks one.

    Raises :class:`SambaMissingInputError` for a missing file, :class:`SambaInputError` (naming
    the file) for inconsistent content, :class:`SambaNoMatchError` when the filters leave no run.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    out = Path(output_dir)
    if not out.is_dir():
        raise SambaMissingInputError("output folder not found", path=out)
    keep = {
        "subject": None if subjects is None else {str(s).removeprefix("sub-") for s in subjects},
        "session": None if sessions is None else {str(s).removeprefix("ses-") for s in sessions},
        "task": None if tasks is None else {str(s).removeprefix("task-") for s in tasks},
    }
    alignments = sorted(set(out.glob("sub-*/**/sub-*_alignment.json")))  # ** includes sub-*/ itself
    if not alignments:
        raise SambaMissingInputError(
            "no participant-level results (sub-*/…_alignment.json) found; run the participant level "
            "first", path=out)
    runs = []
    for alignment in alignments:
        ents = _entities(alignment.name)
        if any(allowed is not None and ents.get(k) not in allowed for k, allowed in keep.items()):
            continue
        runs.append(_load_run(out, alignment, ents, direction, fmri_atlas))
    if not runs:
        raise SambaNoMatchError(f"no participant-level run matches the filters {keep}", path=out)
    check_consistent(runs)
    return runs


def _load_run(out: Path, alignment: Path, ents: dict, direction: str, fmri_atlas: str | None) -> RunData:
    stem = alignment.name[: -len("_alignment.json")]
    folder = alignment.parent
    info = _read_json(alignment)
    # sensor space: <stem>_desc-preproc_timeseries; source space adds _space-<T>_atlas-<A>[...]
    ephys_name = re.compile(re.escape(stem) + r"(_(space|atlas|seg|scale)-[a-zA-Z0-9]+)*"
                            r"_desc-preproc_timeseries\.tsv(\.gz)?")
    ephys_files = sorted(p for d in ("eeg", "meg")
                         for p in (folder / d).glob(f"{stem}_*desc-preproc_timeseries.tsv*")
                         if ephys_name.fullmatch(p.name))
    ephys_file = _one(ephys_files, f"EEG/MEG time series ({stem}_desc-preproc_timeseries.tsv.gz)", folder)
    fmri_files = sorted((folder / "func").glob(f"{stem}_*stat-mean_timeseries.tsv"))
    if fmri_atlas:
        fmri_files = [p for p in fmri_files if fmri_atlas in p.name]
    fmri_file = _one(fmri_files, f"fMRI parcel time series ({stem}_*_stat-mean_timeseries.tsv)",
                     folder / "func", hint="; pick one with fmri_atlas=")

    ephys_meta = _read_json(Path(re.sub(r"\.tsv(\.gz)?$", ".json", str(ephys_file))))
    fmri_meta = _read_json(fmri_file.with_suffix(".json"))
    sfreq = ephys_meta.get("SamplingFrequency")
    tr = fmri_meta.get("RepetitionTime") or (1.0 / fmri_meta["SamplingFrequency"]
                                             if fmri_meta.get("SamplingFrequency") else None)
    if not isinstance(sfreq, (int, float)) or not sfreq > 0:
        raise SambaInputError("sidecar lacks a positive SamplingFrequency", path=ephys_file)
    if not isinstance(tr, (int, float)) or not tr > 0:
        raise SambaInputError("sidecar lacks a positive RepetitionTime", path=fmri_file)
    ephys, ephys_names = _read_timeseries(ephys_file, "EEG/MEG time series")
    fmri, fmri_names = _read_timeseries(fmri_file, "fMRI parcel time series")
    if not np.isfinite(ephys).all():
        raise SambaInputError("EEG/MEG time series holds n/a values", path=ephys_file)

    # Cross-checks against the alignment record.
    if info.get("tr") is not None and not math.isclose(float(info["tr"]), float(tr), rel_tol=1e-4):
        raise SambaInputError(f"RepetitionTime {tr} differs from the alignment's TR {info['tr']}",
                              path=fmri_file)
    n_kept = info.get("n_volumes_kept")
    if n_kept is not None and int(n_kept) != fmri.shape[1]:
        raise SambaInputError(f"{fmri.shape[1]} volumes but the alignment kept {n_kept} "
                              f"({alignment.name}); re-run the participant level", path=fmri_file)
    if info.get("ephys_start_sample") is not None and info.get("ephys_stop_sample") is not None:
        n_eph = int(info["ephys_stop_sample"]) - int(info["ephys_start_sample"])
        if n_eph != ephys.shape[1]:
            raise SambaInputError(f"{ephys.shape[1]} samples but the alignment kept {n_eph} "
                                  f"({alignment.name}); re-run the participant level", path=ephys_file)

    ephys_graph_file = ephys_file.parent / re.sub(r"_timeseries\.tsv(\.gz)?$",
                                                  "_stat-cosine_relmat.tsv", ephys_file.name)
    fmri_graph_file = fmri_file.with_name(fmri_file.name.replace("_stat-mean_timeseries.tsv",
                                                                 "_stat-cosine_relmat.tsv"))
    ephys_graph = _read_relmat(ephys_graph_file, ephys_names, "EEG/MEG cosine graph")
    fmri_graph = _read_relmat(fmri_graph_file, fmri_names, "fMRI cosine graph")
    files = {"alignment": str(alignment), "ephys": str(ephys_file), "fmri": str(fmri_file)}
    if ephys_graph is not None:
        files["ephys_graph"] = str(ephys_graph_file)
    if fmri_graph is not None:
        files["fmri_graph"] = str(fmri_graph_file)
    rmap = _region_map(out, fmri_file)
    if rmap is not None:
        files["region_map"] = rmap.attrs["path"]
    return RunData(
        ephys=ephys, fmri=fmri, ephys_sfreq=float(sfreq), tr=float(tr), ephys_names=ephys_names,
        fmri_names=fmri_names, direction=direction, subject=ents.get("subject", "unknown"),
        session=ents.get("session"), task=ents.get("task"), acquisition=ents.get("acquisition"),
        run=ents.get("run"), ephys_graph=ephys_graph, fmri_graph=fmri_graph, region_map=rmap,
        ephys_space=str(ephys_meta.get("Space", "sensor")), files=files,
    )


def check_consistent(runs: Sequence[RunData]) -> None:
    """All runs must share direction, node names, EEG/MEG sampling rate and TR (one model)."""
    if not runs:
        raise SambaNoMatchError("no runs given")
    first = runs[0]
    for run in runs[1:]:
        where = run.files.get("fmri") or run.key
        if run.direction != first.direction:
            raise ValueError(f"runs mix directions: {first.direction} and {run.direction}")
        if run.ephys_names != first.ephys_names:
            raise SambaInputError(
                f"EEG/MEG nodes differ from {first.key}'s; one model needs the same channels/parcels in "
                "every run", path=run.files.get("ephys") or run.key)
        if run.fmri_names != first.fmri_names:
            raise SambaInputError(f"fMRI parcels differ from {first.key}'s (another atlas?)", path=where)
        if not math.isclose(run.ephys_sfreq, first.ephys_sfreq, rel_tol=_RTOL):
            raise SambaInputError(f"EEG/MEG sampling frequency {run.ephys_sfreq:g} Hz differs from "
                                  f"{first.key}'s {first.ephys_sfreq:g} Hz",
                                  path=run.files.get("ephys") or run.key)
        if not math.isclose(run.tr, first.tr, rel_tol=_RTOL):
            raise SambaInputError(f"TR {run.tr:g} s differs from {first.key}'s {first.tr:g} s", path=where)


# ---------------------------------------------------------------------------------------------
# Window geometry
# ---------------------------------------------------------------------------------------------
def window_volumes(window_s: float, tr: float) -> int:
    """Whole volumes in a window of ``window_s`` seconds (halves up, as ``windows.tsv``)."""
    n = math.floor(float(window_s) / float(tr) + 0.5 + 1e-9)
    if n < 1:
        raise SambaInputError(f"window length {window_s:g} s is shorter than the TR {tr:g} s")
    return n


def snapped_window_s(window_s: float, tr: float) -> float:
    """The window length actually used: a whole number of volumes."""
    return window_volumes(window_s, tr) * float(tr)


def _ephys_window_samples(run: RunData, n_vol: int) -> int:
    """EEG/MEG samples of a window of ``n_vol`` volumes (DataDims' rounding)."""
    return int(round(n_vol * run.tr * run.ephys_sfreq))


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------
@dataclass
class Normalizer:
    """Per-run, per-node z-scoring fitted on the volumes covered by training windows only.

    ``stats[key] = {"ephys_mean", "ephys_std", "fmri_mean", "fmri_std"}`` (lists, JSON-ready);
    ``pooled`` is used for runs without any training window (e.g. withheld subjects).
    """

    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def fit(cls, runs: Sequence[RunData], train_mask: dict[int, np.ndarray]) -> "Normalizer":
        """``train_mask[i]``: bool per volume of run ``i``, True where a training window lies."""
        stats: dict[str, dict[str, np.ndarray]] = {}
        sums: dict[str, list] = {}
        for i, run in enumerate(runs):
            vol = np.asarray(train_mask.get(i, np.zeros(run.n_volumes, bool)), bool)
            if not vol.any():
                continue
            # EEG/MEG samples that belong to the training volumes.
            starts = to_sample(np.flatnonzero(vol) * run.tr, run.ephys_sfreq)
            per_vol = int(round(run.tr * run.ephys_sfreq))
            idx = (starts[:, None] + np.arange(per_vol)[None, :]).ravel()
            idx = idx[idx < run.ephys.shape[1]]
            parts = {"ephys": run.ephys[:, idx].astype(np.float64),
                     "fmri": run.fmri[:, vol].astype(np.float64)}
            entry = {}
            for name, x in parts.items():
                with np.errstate(invalid="ignore"):
                    mean = np.nanmean(x, axis=1) if x.size else np.zeros(x.shape[0])
                    std = np.nanstd(x, axis=1) if x.size else np.ones(x.shape[0])
                entry[f"{name}_mean"], entry[f"{name}_std"] = mean, std
                acc = sums.setdefault(name, [0.0, 0.0, 0])
                acc[0] = acc[0] + np.nansum(x, axis=1)
                acc[1] = acc[1] + np.nansum(x * x, axis=1)
                acc[2] = acc[2] + np.isfinite(x).sum(axis=1)
            stats[run.key] = {k: _safe_std(v) if k.endswith("_std") else np.nan_to_num(v)
                              for k, v in entry.items()}
        if not stats:
            raise SambaInputError("no training window: cannot fit the z-scoring statistics")
        pooled = {}
        for name, (s, ss, n) in sums.items():
            n = np.maximum(n, 1)
            mean = s / n
            pooled[f"{name}_mean"] = np.nan_to_num(mean)
            pooled[f"{name}_std"] = _safe_std(np.sqrt(np.maximum(ss / n - mean**2, 0.0)))
        return cls(stats=stats, pooled=pooled)

    def for_run(self, run: RunData) -> dict[str, np.ndarray]:
        return self.stats.get(run.key, self.pooled)

    def transform(self, run: RunData) -> tuple[np.ndarray, np.ndarray]:
        """(ephys, fmri) z-scored float32 arrays; invalid nodes are 0."""
        key = (id(run), run.key)
        if key not in self._cache:
            st = {k: np.asarray(v, dtype=np.float32)[:, None] for k, v in self.for_run(run).items()}
            ephys = (run.ephys - st["ephys_mean"]) / st["ephys_std"]
            fmri = (run.fmri - st["fmri_mean"]) / st["fmri_std"]
            self._cache[key] = (np.nan_to_num(ephys).astype(np.float32, copy=False),
                                np.nan_to_num(fmri).astype(np.float32, copy=False))
        return self._cache[key]

    def to_dict(self) -> dict[str, Any]:
        def lists(d):
            return {k: np.asarray(v).tolist() for k, v in d.items()}
        return {"stats": {k: lists(v) for k, v in self.stats.items()}, "pooled": lists(self.pooled)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normalizer":
        def arrays(d):
            return {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}
        return cls(stats={k: arrays(v) for k, v in data.get("stats", {}).items()},
                   pooled=arrays(data.get("pooled", {})))


def _safe_std(std: np.ndarray) -> np.ndarray:
    std = np.nan_to_num(np.asarray(std, dtype=np.float64), nan=0.0)
    scale = np.max(std) if std.size else 1.0
    return np.where(std > max(scale, 1e-30) * 1e-6, std, 1.0)


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------
class WindowDataset(Dataset):
    """Aligned windows from segments of runs, z-scored with a (training-fitted) :class:`Normalizer`.

    ``segments``: objects with ``run`` (index into ``runs``), ``start``/``stop`` (fMRI volumes,
    stop exclusive) and ``part`` — see :mod:`samba_pipeline.training.splits`. Windows of
    ``window_s`` start every ``step_s`` seconds (default: the window length, i.e. non-overlapping,
    as evaluation needs) from each segment's start and never leave their segment.

    Items are dicts: ``source`` ``[n_source, source_len]``, ``target`` ``[n_target, target_len]``
    (float32 tensors), ``target_mask`` ``[n_target]`` bool, ``index``. ``self.windows`` is the
    table of windows (run key, subject, part, volume and sample ranges, onset).
    """

    def __init__(self, runs: Sequence[RunData], segments: Sequence, *, window_s: float = 60.0,
                 step_s: float | None = None, normalizer: Normalizer | None = None, part: str | None = None):
        if not runs:
            raise SambaNoMatchError("no runs given")
        check_consistent(runs)
        self.runs = list(runs)
        self.direction = runs[0].direction
        self.tr = runs[0].tr
        self.n_vol = window_volumes(window_s, self.tr)
        self.window_s = self.n_vol * self.tr
        self.step_vol = self.n_vol if step_s is None else window_volumes(step_s, self.tr)
        self.segments = list(segments)
        parts = {s.part for s in self.segments}
        self.part = part if part is not None else (parts.pop() if len(parts) == 1 else "mixed")
        if normalizer is None:
            normalizer = Normalizer.fit(self.runs, self.volume_masks())
            LOGGER.info("normalizer fitted on this dataset's own windows (%s part)", self.part)
        self.normalizer = normalizer
        n_samp = _ephys_window_samples(self.runs[0], self.n_vol)
        self.n_samp = n_samp
        rows = []
        for seg in self.segments:
            run = self.runs[seg.run]
            starts = np.arange(seg.start, seg.stop - self.n_vol + 1, self.step_vol, dtype=np.int64)
            eph = to_sample(starts * run.tr, run.ephys_sfreq)
            fits = eph + n_samp <= run.ephys.shape[1]
            if not fits.all():
                LOGGER.warning("%s: %d window(s) at the end lack EEG/MEG samples and are dropped",
                               run.key, int((~fits).sum()))
            for s, e in zip(starts[fits], eph[fits]):
                rows.append({"run": seg.run, "key": run.key, "subject": run.subject, "part": seg.part,
                             "fmri_start": int(s), "fmri_stop": int(s + self.n_vol),
                             "ephys_start": int(e), "ephys_stop": int(e + n_samp),
                             "onset_s": float(s * run.tr)})
        self.windows = pd.DataFrame(rows, columns=["run", "key", "subject", "part", "fmri_start", "fmri_stop",
                                                   "ephys_start", "ephys_stop", "onset_s"])
        columns = ["run", "ephys_start", "ephys_stop", "fmri_start", "fmri_stop"]
        self._index = self.windows[columns].to_numpy(np.int64)
        self._arrays = [normalizer.transform(run) for run in self.runs]
        self._masks = [torch.from_numpy(np.asarray(run.target_valid, bool).copy()) for run in self.runs]

    def volume_masks(self) -> dict[int, np.ndarray]:
        """Per run: True on every volume covered by one of this dataset's windows."""
        masks: dict[int, np.ndarray] = {}
        for seg in self.segments:
            run = self.runs[seg.run]
            mask = masks.setdefault(seg.run, np.zeros(run.n_volumes, bool))
            for s in range(seg.start, seg.stop - self.n_vol + 1, self.step_vol):
                mask[s:s + self.n_vol] = True
        return masks

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        run, e0, e1, f0, f1 = (int(v) for v in self._index[index])
        ephys, fmri = self._arrays[run]
        e, f = ephys[:, e0:e1], fmri[:, f0:f1]
        src, tgt = (e, f) if self.direction == "ephys2fmri" else (f, e)
        return {"source": torch.from_numpy(np.ascontiguousarray(src)),
                "target": torch.from_numpy(np.ascontiguousarray(tgt)),
                "target_mask": self._masks[run], "index": int(index)}

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All windows at once: source ``[W, S, Ls]``, target ``[W, T, Lt]``, mask ``[W, T]``."""
        items = [self[i] for i in range(len(self))]
        if not items:
            raise SambaInputError(f"the {self.part} part holds no window of {self.window_s:g} s")
        return (np.stack([it["source"].numpy() for it in items]),
                np.stack([it["target"].numpy() for it in items]),
                np.stack([it["target_mask"].numpy() for it in items]))

    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Targets ``[W, T, Lt]`` and masks ``[W, T]`` of all windows (no source copies)."""
        if len(self) == 0:
            raise SambaInputError(f"the {self.part} part holds no window of {self.window_s:g} s")
        fmri_target = self.direction == "ephys2fmri"
        out = []
        for run, e0, e1, f0, f1 in self._index:
            ephys, fmri = self._arrays[run]
            out.append(fmri[:, f0:f1] if fmri_target else ephys[:, e0:e1])
        masks = np.stack([self._masks[run].numpy() for run in self._index[:, 0]])
        return np.stack(out), masks

    @property
    def target_sfreq(self) -> float:
        return self.runs[0].target_sfreq

    @property
    def target_names(self) -> list[str]:
        return self.runs[0].target_names


def collate_windows(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack items into a :class:`Batch`.

    ``target_mask`` is ``[n_target]`` as the model protocol says: the AND of the items' masks (a
    node without valid data in any window of the batch is left out of that batch's loss).
    """
    masks = torch.stack([it["target_mask"] for it in items])
    return Batch(source=torch.stack([it["source"] for it in items]),
                 target=torch.stack([it["target"] for it in items]),
                 target_mask=masks.all(dim=0))


# ---------------------------------------------------------------------------------------------
# Dimensions
# ---------------------------------------------------------------------------------------------
def _mean_graph(graphs: list[np.ndarray | None]) -> np.ndarray | None:
    present = [g for g in graphs if g is not None]
    if not present:
        return None
    with np.errstate(invalid="ignore"):
        stack = np.stack(present)
        mean = np.nanmean(stack, axis=0) if np.isfinite(stack).any() else stack[0]
    return np.nan_to_num(mean)


def region_map_for(runs: Sequence[RunData]) -> np.ndarray | None:
    """Region map ``[n_fmri, n_ephys]`` when it applies to these nodes (EEG/MEG in parcels named
    like the map's columns), else None (sensor space: every source may feed every target)."""
    rmap = runs[0].region_map
    if rmap is None:
        return None
    run = runs[0]
    if list(rmap.index) != run.fmri_names or list(rmap.columns) != run.ephys_names:
        if run.ephys_space != "sensor":
            LOGGER.warning("region map nodes do not match the %s EEG/MEG nodes; not used", run.ephys_space)
        return None
    return rmap.to_numpy(dtype=np.float64)


def make_dims(runs: Sequence[RunData], window_s: float = 60.0, direction: str | None = None) -> DataDims:
    """The :class:`DataDims` of these runs: group-mean graphs, region map when applicable.

    ``window_s`` is snapped to whole volumes (see the module docstring). The region map keeps
    the fMRI parcels as rows and EEG/MEG parcels as columns in both directions.
    """
    if not runs:
        raise SambaNoMatchError("no runs given")
    if direction is not None and direction != runs[0].direction:
        runs = [r.with_direction(direction) for r in runs]
    check_consistent(runs)
    first = runs[0]
    return DataDims(
        direction=first.direction, n_source=len(first.source_names), n_target=len(first.target_names),
        source_sfreq=float(first.source_sfreq), target_sfreq=float(first.target_sfreq),
        window_s=snapped_window_s(window_s, first.tr), source_names=list(first.source_names),
        target_names=list(first.target_names),
        source_graph=_mean_graph([r.source_graph for r in runs]),
        target_graph=_mean_graph([r.target_graph for r in runs]),
        region_map=region_map_for(runs),
    )
