"""Pairing rules for non-simultaneous recordings (``--pairing same-subject|same-stimulus``).

EEG/MEG and fMRI recorded in different sessions (or by different subjects) while watching the
same stimulus, as in StudyForrest, are paired by the stimulus (the BIDS ``task``), not by
session and run:

* ``same-subject``: each fMRI run gets an EEG/MEG recording of the same subject and task from
  *another* session (the one with the same run label if there are several, else the first);
* ``same-stimulus``: as ``same-subject`` when the subject has such a recording; otherwise a
  recording of the same task from another subject (the subjects with one take turns, in label
  order, so that every fMRI run is used).

A pair is named after its fMRI run (subject, session, task, run): its derivatives, including the
EEG/MEG series, are written under that name, and the sidecars' ``Sources`` name the EEG/MEG
recording. The two sessions are aligned by their stimulus-segment events
(:func:`samba_pipeline.align.estimate_stimulus_alignment`): ``events.tsv`` beside the EEG/MEG
recording and the raw fMRI run's ``events.tsv`` (``ephys_events``/``bold_events``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from samba_pipeline.config import PAIRING_RULES
from samba_pipeline.errors import SambaUsageError


def check_pairing(rule: str) -> str:
    if rule not in PAIRING_RULES:
        raise SambaUsageError(f"pairing {rule!r}; choose one of {', '.join(PAIRING_RULES)}")
    return rule


def _ents(bids_file) -> dict:
    ents = bids_file.get_entities()
    return {k: (str(v) if v is not None else None) for k, v in ents.items()}


def _sort_key(bids_file) -> tuple:
    e = _ents(bids_file)
    return (e.get("subject") or "", e.get("session") or "", e.get("run") or "", bids_file.path)


def bold_events_file(layout, bold) -> str | None:
    """The raw fMRI run's ``events.tsv`` (pybids, with BIDS inheritance), or None."""
    ents = _ents(bold)
    query = {k: ents[k] for k in ("subject", "session", "task", "run", "acquisition")
             if ents.get(k) is not None}
    if "run" in query:
        query["run"] = int(query["run"]) if query["run"].isdigit() else query["run"]
    found = layout.get(scope="raw", suffix="events", extension=".tsv", datatype="func", **query)
    return found[0].path if found else None


def expected_bold_events(bids_dir, pair) -> Path:
    """Where the fMRI run's events.tsv is expected (named in errors)."""
    parts = [f"sub-{pair.subject}"] + ([f"ses-{pair.session}"] if pair.session else [])
    stem = "_".join(parts + [f"task-{pair.task}"] + ([f"run-{pair.run}"] if pair.run else []))
    return Path(bids_dir, *parts, "func", f"{stem}_events.tsv")


def pair_by_stimulus(subject: str, subjects: list[str], ephys_files: list, other_ephys: list,
                     bolds: list, source: str, layout, report, rule: str, make_pair,
                     bids_dir) -> list:
    """Non-simultaneous pairs of one subject's fMRI runs (module docstring).

    ``ephys_files``: the subject's EEG/MEG recordings; ``other_ephys``: other subjects'
    (``same-stimulus`` only); ``make_pair``: :func:`samba_pipeline.bids.layout._make_pair`.
    Unpaired fMRI runs are listed in ``report.skipped``.
    """
    from samba_pipeline.ephys.read import events_path

    check_pairing(rule)
    own = sorted(ephys_files, key=_sort_key)
    others = sorted(other_ephys, key=_sort_key)
    pairs = []
    for bold in sorted(bolds, key=_sort_key):
        b = _ents(bold)
        cands = [e for e in own if _ents(e).get("task") == b.get("task")
                 and _ents(e).get("session") != b.get("session")]
        if not cands and rule == "same-stimulus":
            pool = [e for e in others if _ents(e).get("task") == b.get("task")]
            ephys_subjects = sorted({_ents(e)["subject"] for e in pool})
            if ephys_subjects:
                pick = ephys_subjects[subjects.index(subject) % len(ephys_subjects)
                                      if subject in subjects else 0]
                cands = [e for e in pool if _ents(e)["subject"] == pick]
        if not cands:
            where = ("another session of this subject" if rule == "same-subject"
                     else "another session or subject")
            report.skipped.append(f"{Path(bold.path).name}: no EEG/MEG recording of task "
                                  f"{b.get('task')} in {where}")
            continue
        same_run = [e for e in cands if _ents(e).get("run") == b.get("run")]
        eph = (same_run or cands)[0]
        pair = make_pair(subject, eph, bold, source, layout)
        pair = dataclasses.replace(
            pair, subject=subject, session=b.get("session"), task=b.get("task"),
            run=b.get("run"), acquisition=b.get("acquisition"), pairing=rule,
            ephys_events=str(events_path(eph.path)),
            bold_events=bold_events_file(layout, bold))
        if pair.bold_events is None:
            pair = dataclasses.replace(pair, bold_events=str(expected_bold_events(bids_dir, pair)))
        pairs.append(pair)
    return pairs


__all__ = ["check_pairing", "pair_by_stimulus", "bold_events_file", "expected_bold_events"]
