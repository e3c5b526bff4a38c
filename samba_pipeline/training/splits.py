"""Train / validation / test splits that autocorrelation cannot leak across.

Two schemes:

* :func:`split_by_time` — withheld time windows within every run (the seed paper's scheme):
  consecutive blocks along each run's timeline (by default train, then validation, then test),
  separated by a gap of at least ``gap_s`` (default 30 s, the length of the HRF) that belongs to
  no part, so that no training window lies within one HRF of a withheld one.
* :func:`split_by_subject` — withheld subjects: the test (and optionally validation) subjects'
  runs are withheld whole; without validation subjects the validation windows are a gapped block
  at the end of every training run.

A :class:`Split` is a list of :class:`Segment` (run index, part, volume range on the fMRI grid).
Model selection (early stopping, best epoch) uses the ``"val"`` part only; the ``"test"`` part is
touched once, by the final evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import pandas as pd

from samba_pipeline.errors import SambaInputError, SambaUsageError
from samba_pipeline.training.data import RunData, WindowDataset, window_volumes

PARTS = ("train", "val", "test")
#: Default gap between training and withheld windows (s): the length of the HRF.
DEFAULT_GAP_S = 30.0


@dataclass(frozen=True)
class Segment:
    """Volumes ``[start, stop)`` of run ``run`` (index into the run list) given to ``part``."""

    run: int
    part: str
    start: int
    stop: int

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, not {self.part!r}")
        if not 0 <= self.start < self.stop:
            raise ValueError(f"empty or negative segment [{self.start}, {self.stop})")


@dataclass
class Split:
    """Segments of every part, with the gap (s) they were built to respect."""

    segments: list[Segment]
    gap_s: float = DEFAULT_GAP_S
    kind: str = "time"
    run_keys: list[str] = field(default_factory=list)

    def part(self, name: str) -> list[Segment]:
        if name not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, not {name!r}")
        return [s for s in self.segments if s.part == name]

    def to_frame(self, runs: Sequence[RunData] | None = None) -> pd.DataFrame:
        table = pd.DataFrame([asdict(s) for s in self.segments], columns=["run", "part", "start", "stop"])
        if runs is not None:
            table.insert(1, "key", [runs[i].key for i in table["run"]])
            tr = [runs[i].tr for i in table["run"]]
            table["start_s"] = table["start"] * tr
            table["stop_s"] = table["stop"] * tr
        return table

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "gap_s": self.gap_s, "run_keys": self.run_keys,
                           "segments": [asdict(s) for s in self.segments]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Split":
        data = json.loads(text)
        return cls(segments=[Segment(**s) for s in data["segments"]], gap_s=float(data["gap_s"]),
                   kind=data.get("kind", "time"), run_keys=list(data.get("run_keys", [])))


def check_split(split: Split, runs: Sequence[RunData], gap_s: float | None = None) -> None:
    """Raise ``AssertionError`` if segments overlap, leave their run, if two segments of different
    parts of the same run lie closer than ``gap_s`` (default ``split.gap_s``; this keeps training
    windows one HRF away from withheld ones, and validation windows from test windows), or if a
    subject split has a subject in both the training and the test part."""
    gap_s = split.gap_s if gap_s is None else gap_s
    by_run: dict[int, list[Segment]] = {}
    subjects: dict[str, set[str]] = {p: set() for p in PARTS}
    for seg in split.segments:
        subjects[seg.part].add(runs[seg.run].subject)
        if not 0 <= seg.run < len(runs):
            raise AssertionError(f"segment {seg} names run {seg.run} of {len(runs)}")
        if seg.stop > runs[seg.run].n_volumes:
            raise AssertionError(f"segment {seg} ends after the run's {runs[seg.run].n_volumes} volumes")
        by_run.setdefault(seg.run, []).append(seg)
    if split.kind == "subject":
        shared = subjects["train"] & subjects["test"]
        if shared:
            raise AssertionError(f"subject(s) {sorted(shared)} in both the training and the test part")
    for run_index, segs in by_run.items():
        tr = runs[run_index].tr
        segs = sorted(segs, key=lambda s: s.start)
        for i, a in enumerate(segs):
            for b in segs[i + 1:]:
                if b.start < a.stop:
                    raise AssertionError(f"segments overlap: {a} and {b}")
                if a.part != b.part:
                    gap = (b.start - a.stop) * tr
                    if gap < gap_s - 1e-9:
                        raise AssertionError(
                            f"only {gap:g} s between {a} and {b}; at least {gap_s:g} s needed")


def _block_volumes(fraction: float, n: int, win: int) -> int:
    """At least one window, else the fraction of the run rounded to whole windows."""
    if fraction <= 0:
        return 0
    return max(win, win * int(round(fraction * n / win)))


def split_by_time(runs: Sequence[RunData], *, window_s: float = 60.0, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, gap_s: float = DEFAULT_GAP_S,
                  order: Sequence[str] = PARTS) -> Split:
    """Withhold time blocks within every run.

    Each run is cut into consecutive blocks in ``order`` (default train, val, test), the
    withheld blocks holding ``fraction`` of the run rounded to whole windows (at least one
    window; a fraction of 0 drops that part), the training block the rest, with ``gap_s``
    (rounded up to whole volumes) of unused data between consecutive blocks.
    """
    if sorted(order) != sorted(PARTS):
        raise SambaUsageError(f"order must be a permutation of {PARTS}, not {tuple(order)}")
    if gap_s < 0 or not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise SambaUsageError("gap_s must be >= 0 and fractions in [0, 1)")
    segments = []
    for i, run in enumerate(runs):
        win = window_volumes(window_s, run.tr)
        gap = math.ceil(gap_s / run.tr - 1e-9)
        sizes = {"val": _block_volumes(val_fraction, run.n_volumes, win),
                 "test": _block_volumes(test_fraction, run.n_volumes, win)}
        present = [p for p in order if p == "train" or sizes[p] > 0]
        sizes["train"] = run.n_volumes - sizes["val"] - sizes["test"] - gap * (len(present) - 1)
        if sizes["train"] < win:
            need = (win * len(present) + gap * (len(present) - 1)) * run.tr
            raise SambaInputError(
                f"{run.key}: {run.duration_s:g} s is too short for a time split with {window_s:g} s windows "
                f"and a {gap_s:g} s gap (needs at least {need:g} s); use shorter windows, a smaller "
                "gap or a subject split", path=run.files.get("fmri"))
        pos = 0
        for p in present:
            segments.append(Segment(run=i, part=p, start=pos, stop=pos + sizes[p]))
            pos += sizes[p] + gap
    split = Split(segments=segments, gap_s=float(gap_s), kind="time", run_keys=[r.key for r in runs])
    check_split(split, runs)
    return split


def split_by_subject(runs: Sequence[RunData], test_subjects: Iterable[str], *,
                     val_subjects: Iterable[str] | None = None, window_s: float = 60.0,
                     val_fraction: float = 0.15, gap_s: float = DEFAULT_GAP_S) -> Split:
    """Withhold whole subjects for testing (and validation).

    Without ``val_subjects`` the validation part is a block of ``val_fraction`` (whole windows,
    at least one) at the end of every training run, ``gap_s`` after its training block.
    """
    test = {str(s).removeprefix("sub-") for s in test_subjects}
    val = None if val_subjects is None else {str(s).removeprefix("sub-") for s in val_subjects}
    subjects = {r.subject for r in runs}
    for name, chosen in (("test", test), ("validation", val or set())):
        unknown = chosen - subjects
        if unknown:
            raise SambaUsageError(f"{name} subject(s) {sorted(unknown)} not among {sorted(subjects)}")
    if val and val & test:
        raise SambaUsageError(f"subject(s) {sorted(val & test)} both validation and test")
    if not test:
        raise SambaUsageError("no test subject given")
    train_subjects = subjects - test - (val or set())
    if not train_subjects:
        raise SambaUsageError("every subject is withheld; none is left to train on")
    segments = []
    for i, run in enumerate(runs):
        if run.subject in test:
            segments.append(Segment(i, "test", 0, run.n_volumes))
        elif val is not None and run.subject in val:
            segments.append(Segment(i, "val", 0, run.n_volumes))
        elif val is not None:
            segments.append(Segment(i, "train", 0, run.n_volumes))
        else:
            sub = split_by_time([run], window_s=window_s, val_fraction=val_fraction, test_fraction=0.0,
                                gap_s=gap_s)
            segments.extend(Segment(i, s.part, s.start, s.stop) for s in sub.segments)
    split = Split(segments=segments, gap_s=float(gap_s), kind="subject", run_keys=[r.key for r in runs])
    check_split(split, runs)
    return split


def split_by_time_and_subject(runs: Sequence[RunData], test_subjects: Iterable[str], *,
                              window_s: float = 60.0, val_fraction: float = 0.15,
                              test_fraction: float = 0.15, gap_s: float = DEFAULT_GAP_S) -> Split:
    """One split with two test sets: the test subjects' runs are withheld whole, and every other
    run is cut in time (train, validation and test blocks as :func:`split_by_time` cuts them).

    The test part then holds both withheld windows of the training subjects and withheld
    subjects; :func:`withheld_sets` separates them for evaluation.
    """
    test = {str(s).removeprefix("sub-") for s in test_subjects}
    subjects = {r.subject for r in runs}
    if not test:
        raise SambaUsageError("no test subject given")
    if test - subjects:
        raise SambaUsageError(f"test subject(s) {sorted(test - subjects)} not among {sorted(subjects)}")
    if not subjects - test:
        raise SambaUsageError("every subject is withheld; none is left to train on")
    segments = []
    for i, run in enumerate(runs):
        if run.subject in test:
            segments.append(Segment(i, "test", 0, run.n_volumes))
            continue
        sub = split_by_time([run], window_s=window_s, val_fraction=val_fraction,
                            test_fraction=test_fraction, gap_s=gap_s)
        segments.extend(Segment(i, s.part, s.start, s.stop) for s in sub.segments)
    split = Split(segments=segments, gap_s=float(gap_s), kind="time+subject", run_keys=[r.key for r in runs])
    check_split(split, runs)
    return split


def withheld_sets(runs: Sequence[RunData], split: Split, test_subjects: Iterable[str] = ()
              ) -> dict[str, list[Segment]]:
    """The test segments grouped as ``{"withheld_windows": [...], "withheld_subjects": [...]}``
    (empty groups left out): segments of the test subjects vs those of the training subjects."""
    test = {str(s).removeprefix("sub-") for s in test_subjects}
    groups: dict[str, list[Segment]] = {}
    for seg in split.part("test"):
        name = "withheld_subjects" if runs[seg.run].subject in test else "withheld_windows"
        groups.setdefault(name, []).append(seg)
    return groups


def make_datasets(runs: Sequence[RunData], split: Split, *, window_s: float = 60.0,
                  train_step_s: float | None = None, eval_window_s: float | None = None
                  ) -> dict[str, WindowDataset]:
    """One :class:`WindowDataset` per part present in ``split``, all z-scored with statistics of
    the training windows only.

    Training windows start every ``train_step_s`` (default: a quarter of the window, at least one
    TR; overlapping windows are augmentation, never shared with withheld parts thanks to the
    gaps); validation and test windows are non-overlapping, ``eval_window_s`` long (default
    ``window_s``).
    """
    check_split(split, runs)
    tr = runs[0].tr
    step = train_step_s if train_step_s is not None else max(tr, window_s / 4.0)
    if not split.part("train"):
        raise SambaInputError("the split has no training part")
    # Fitted on the training windows themselves (WindowDataset without a normalizer).
    train = WindowDataset(runs, split.part("train"), window_s=window_s, step_s=step, part="train")
    if len(train) == 0:
        raise SambaInputError(f"no training window of {window_s:g} s fits in the training part")
    normalizer = train.normalizer
    out = {"train": train}
    for part in ("val", "test"):
        segs = split.part(part)
        if segs:
            out[part] = WindowDataset(runs, segs, window_s=eval_window_s or window_s, step_s=None,
                                      normalizer=normalizer, part=part)
    return out
