"""Per-subject reports: reportlets (figures and HTML fragments) and the ``OUT/sub-XX.html`` page.

As in fMRIPrep, a report is assembled from *reportlets* in ``OUT/sub-XX/figures/`` named with
BIDS entities (``sub-01_task-rest_desc-psd_eeg.svg``). Three functions make them:

:func:`run_reportlets`
    the participant-level QC of one EEG/MEG-fMRI run (power spectra, bad channels, carpet plot,
    motion, atlases, connectivity, alignment, a summary table), from the run's files
:func:`model_reportlets`
    for every prediction in the subject's derivatives: predicted against measured series, a brain
    map of the per-parcel correlation, the model's learned HRFs and wavelet attention, metrics
:func:`assemble_subject_report`
    the HTML page (an :class:`mne.Report`) from whatever reportlets the folder holds, so the
    group level can add its model sections and rebuild the page.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from samba_pipeline.bids.derivatives import derivative_path, read_tsv, write_text

LOGGER = logging.getLogger("samba_pipeline.reports")
_RUN_KEYS = ("subject", "session", "task", "acquisition", "run")
_SHORT = {"session": "ses", "task": "task", "acquisition": "acq", "run": "run", "subject": "sub"}


def figure_name(entities: dict, desc: str, suffix: str, extension: str) -> str:
    """The BIDS file name of a reportlet (``sub-01_task-rest_desc-psd_eeg.svg``)."""
    ents = {k: entities[k] for k in _RUN_KEYS if entities.get(k)}
    return derivative_path("", **ents, desc=desc, suffix=suffix, extension=extension).name


def _table_html(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(k))}</th>"
        f"<td>{html.escape(str(v))}</td></tr>"
        for k, v in rows
    )
    return f"<table class='table table-sm'>{cells}</table>"


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return {}


def _networks(atlas_table, names) -> list[str] | None:
    if not atlas_table or not Path(atlas_table).is_file():
        return None
    table = pd.read_csv(atlas_table, sep="\t")
    if "network" not in table:
        return None
    by_name = dict(zip(table["name"].astype(str), table["network"].astype(str)))
    nets = [by_name.get(str(n)) for n in names]
    return None if any(n is None for n in nets) else nets


# ---------------------------------------------------------------------------------------------
# Participant level: one run
# ---------------------------------------------------------------------------------------------
def run_reportlets(
    folder,
    *,
    entities: dict,
    ephys_datatype: str = "eeg",
    psd_file=None,
    ephys_report_json=None,
    channels_tsv=None,
    events_tsv=None,
    alignment_json=None,
    confounds_qc_json=None,
    bold_file=None,
    mask_file=None,
    confounds_file=None,
    tr: float | None = None,
    fd_threshold: float = 0.5,
    fmri_timeseries=None,
    ephys_graph=None,
    fmri_graph=None,
    atlases: list[tuple[str, str, str]] | None = None,
) -> list[str]:
    """Write the QC reportlets of one run into ``folder`` (file names only, no sub-folders).

    Every input is optional: a reportlet is made when its data are there (an EEG-only run gets
    the EEG/MEG reportlets). ``atlases``: ``[(label, dseg image, label table), ...]``.
    Returns the written paths.
    """
    from samba_pipeline.reports import figures as F

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    run = "_".join(f"{_SHORT[k]}-{entities[k]}" for k in _RUN_KEYS[1:] if entities.get(k))
    dt = ephys_datatype or "eeg"
    timings: dict[str, float] = {}

    def _save(fig, desc, suffix, ext=".svg"):
        path = F.save_figure(fig, folder / figure_name(entities, desc, suffix, ext))
        written.append(str(path))

    t0 = time.perf_counter()
    report = _read_json(ephys_report_json) if ephys_report_json else {}
    summary_rows: list[tuple[str, Any]] = []
    if report:
        filt = report.get("filter", {})
        if psd_file and Path(psd_file).is_file():
            from samba_pipeline.reports.psd import load_psd_summary

            psd = load_psd_summary(psd_file)
            psd["bad_channels"] = np.array(report.get("bad_channels", []), dtype=str)
            _save(
                F.psd_figure(
                    psd,
                    l_freq=filt.get("l_freq"),
                    h_freq=filt.get("h_freq"),
                    notch_freqs=filt.get("notch_freqs"),
                    title=f"{run}: power spectral density",
                ),
                "psd",
                dt,
            )
        mr = report.get("mr_artifacts") or {}
        mr_text = "; ".join(
            f"{k}: {'applied' if (v or {}).get('applied') else 'not applied'}"
            + (f" ({v.get('reason')})" if isinstance(v, dict) and v.get("reason") else "")
            for k, v in mr.items()
            if isinstance(v, dict)
        )
        summary_rows += [
            ("EEG/MEG channels", f"{report.get('n_channels')} ({', '.join(report.get('ch_types', []))})"),
            ("sampling rate", f"{report.get('sfreq_original')} Hz -> {report.get('sfreq')} Hz"),
            (
                "filters",
                f"notch {filt.get('notch_freqs')}, band-pass {filt.get('l_freq')}-{filt.get('h_freq')} Hz",
            ),
            ("bad channels", ", ".join(report.get("bad_channels", [])) or "none"),
            (
                "interpolated / dropped",
                f"{', '.join(report.get('interpolated', [])) or 'none'} / "
                f"{', '.join(report.get('dropped', [])) or 'none'}",
            ),
            ("reference", report.get("reference")),
            ("MR artifact correction", mr_text or "n/a"),
        ]
    timings["psd"] = time.perf_counter() - t0
    if channels_tsv and Path(channels_tsv).is_file():
        channels = read_tsv(channels_tsv)
        th = report.get("thresholds", {})
        _save(
            F.bad_channels_figure(
                channels,
                noisy_z=th.get("noisy_z_threshold", 5.0),
                correlation=th.get("correlation_threshold", 0.4),
                title=f"{run}: bad-channel criteria",
            ),
            "badchannels",
            dt,
        )
    timings["bads"] = time.perf_counter() - t0

    confounds = None
    if confounds_file and Path(confounds_file).is_file():
        confounds = read_tsv(confounds_file)
    qc = _read_json(confounds_qc_json) if confounds_qc_json else {}
    if qc:
        summary_rows += [
            ("confound strategy", f"{qc.get('strategy')}: {qc.get('description', '')}"),
            ("regressors", f"{qc.get('n_regressors', len(qc.get('columns', [])))} columns"),
            (
                "high-motion volumes",
                f"{qc.get('n_high_motion', qc.get('high_motion_volumes', 'n/a'))}"
                if not isinstance(qc.get("high_motion_volumes"), list)
                else f"{len(qc['high_motion_volumes'])} (FD > {fd_threshold:g} mm)",
            ),
            (
                "mean FD",
                f"{qc.get('mean_fd'):.3f} mm" if isinstance(qc.get("mean_fd"), (int, float)) else "n/a",
            ),
            ("parcels below coverage", qc.get("n_parcels_below_coverage", "n/a")),
        ]
    fmri_names = None
    fmri_table = atlases[-1][2] if atlases else None
    if bold_file and Path(bold_file).is_file() and tr:
        series = read_tsv(fmri_timeseries) if fmri_timeseries and Path(fmri_timeseries).is_file() else None
        if series is not None:
            fmri_names = list(series.columns)
        _save(
            F.carpet_figure(
                bold_file,
                mask_file,
                tr=tr,
                parcel_series=series,
                networks=_networks(fmri_table, fmri_names or []),
                title=f"{run}: carpet plot",
            ),
            "carpet",
            "bold",
            ".png",
        )
    timings["carpet"] = time.perf_counter() - t0
    if confounds is not None and tr and any(c in confounds for c in ("trans_x", "framewise_displacement")):
        _save(
            F.motion_figure(confounds, tr=tr, fd_threshold=fd_threshold, title=f"{run}: head motion"),
            "motion",
            "bold",
        )
    if atlases:
        _save(
            F.atlas_figure(
                [(label, image) for label, image, _ in atlases], title="atlases over the MNI152 template"
            ),
            "atlases",
            "dseg",
            ".png",
        )
    timings["atlas"] = time.perf_counter() - t0
    if ephys_graph and fmri_graph and Path(ephys_graph).is_file() and Path(fmri_graph).is_file():
        fg = read_tsv(fmri_graph)
        _save(
            F.connectivity_figure(
                read_tsv(ephys_graph),
                fg,
                ephys_label=dt.upper(),
                fmri_networks=_networks(fmri_table, fg["Node"] if "Node" in fg else []),
                title=f"{run}: connectivity",
            ),
            "connectivity",
            "relmat",
        )
    if alignment_json and Path(alignment_json).is_file():
        alignment = _read_json(alignment_json)
        events = read_tsv(events_tsv) if events_tsv and Path(events_tsv).is_file() else None
        _save(F.alignment_figure(alignment, events, title=f"{run}: alignment"), "alignment", dt)
        summary_rows += [
            (
                "alignment",
                f"{alignment.get('method')}: fMRI volume 0 at {alignment.get('offset_s', 0):.3f} s "
                f"on the EEG/MEG clock",
            ),
            (
                "volumes kept",
                f"{alignment.get('n_volumes_kept')} of {alignment.get('n_volumes')} "
                f"({alignment.get('duration_s')} s)",
            ),
            ("alignment warnings", "; ".join(alignment.get("warnings", [])) or "none"),
        ]
    timings["rest"] = time.perf_counter() - t0
    if summary_rows:
        path = folder / figure_name(entities, "summary", dt, ".html")
        written.append(str(write_text(path, _table_html(summary_rows))))
    LOGGER.info(
        "%s reportlets in %.1f s (%s)",
        run,
        time.perf_counter() - t0,
        ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
    )
    return written


# ---------------------------------------------------------------------------------------------
# Model reportlets (from the derivatives: participant --model-file, and the group level)
# ---------------------------------------------------------------------------------------------
_ENTITY_RE = re.compile(r"(sub|ses|task|acq|run|space|atlas|seg|scale|desc|stat)-([a-zA-Z0-9]+)")
_LONG = {"sub": "subject", "ses": "session", "task": "task", "acq": "acquisition", "run": "run"}


def _entities(name: str) -> dict[str, str]:
    return {_LONG.get(k, k): v for k, v in _ENTITY_RE.findall(name)}


def _model_card(output_dir: Path, model_file: str | None) -> tuple[dict, Path | None]:
    if not model_file:
        return {}, None
    path = (
        Path(output_dir) / model_file.removeprefix("bids::")
        if str(model_file).startswith("bids::")
        else Path(model_file)
    )
    return _read_json(path), path if path.is_file() else None


def _atlas_of(series_json: Path, output_dir: Path) -> tuple[str | None, str | None]:
    node_files = str(_read_json(series_json).get("NodeFiles", ""))
    if not node_files.startswith("bids::"):
        return None, None
    image = output_dir / node_files.removeprefix("bids::")
    table = Path(str(image).replace(".nii.gz", ".tsv"))
    return (str(image), str(table)) if image.is_file() and table.is_file() else (None, None)


def model_reportlets(output_dir, subject: str) -> list[str]:
    """Reportlets of every prediction in ``OUT/sub-<subject>`` (written into its figures folder)."""
    from samba_pipeline.reports import figures as F
    from samba_pipeline.reports.boilerplate import model_methods_html

    output_dir = Path(output_dir)
    sub_dir = output_dir / f"sub-{subject}"
    folder = sub_dir / "figures"
    written: list[str] = []
    done_models: set[tuple[str, str]] = set()
    for pred_path in sorted(sub_dir.rglob("*_stat-mean_predicted.tsv*")):
        ents = _entities(pred_path.name)
        label = ents.get("desc", "model")
        meta = _read_json(str(pred_path).replace(".tsv.gz", ".json").replace(".tsv", ".json"))
        direction = meta.get("Direction", "ephys2fmri")
        suffix = "bold" if direction == "ephys2fmri" else pred_path.parent.name
        sfreq = float(meta.get("SamplingFrequency") or 1.0)
        pred = read_tsv(pred_path)
        std_path = Path(str(pred_path).replace("_stat-mean_", "_stat-std_"))
        std = read_tsv(std_path) if std_path.is_file() else None
        if direction == "ephys2fmri":
            target_path = Path(
                str(pred_path).replace(f"_desc-{label}_stat-mean_predicted", "_stat-mean_timeseries")
            )
        else:
            run_prefix = pred_path.name.split(f"_desc-{label}_")[0]
            target_path = pred_path.parent / f"{run_prefix}_desc-preproc_timeseries.tsv.gz"
        target = read_tsv(target_path) if target_path.is_file() else None
        run = "_".join(f"{_SHORT[k]}-{ents[k]}" for k in _RUN_KEYS[1:] if ents.get(k))
        what = f"{run}: {label} prediction ({direction})"

        def _save(fig, desc, ext=".svg", _ents=ents, _suffix=suffix):
            path = F.save_figure(fig, folder / figure_name(_ents, desc, _suffix, ext))
            written.append(str(path))

        if direction != "ephys2fmri" and pred.shape[1] > 0 and pred.shape[0] > 2000:
            pred = pred.iloc[: int(60 * sfreq)]  # a minute of EEG/MEG is readable
            std = std.iloc[: len(pred)] if std is not None else None
        _save(
            F.prediction_figure(
                pred,
                target,
                sfreq=sfreq,
                std=std,
                title=what + (" against the measured series" if target is not None else ""),
            ),
            f"{label}Prediction",
        )
        metrics = (
            _read_json(Path(str(pred_path).split(f"_desc-{label}_")[0] + f"_desc-{label}_metrics.json"))
            if target is not None
            else {}
        )
        if target is not None:
            names = [str(c) for c in pred.columns]
            common = [c for c in names if c in target.columns]
            r = F.parcel_correlations(pred[common].to_numpy(float).T, target[common].to_numpy(float).T)
            atlas_image, atlas_table = _atlas_of(
                Path(str(target_path).replace(".tsv.gz", ".json").replace(".tsv", ".json")), output_dir
            )
            if atlas_image:
                _save(
                    F.brain_map_figure(
                        r,
                        common,
                        atlas_image,
                        atlas_table,
                        label="Pearson r",
                        title=f"{run}: correlation of predicted and measured series per parcel "
                        f"(median r = {np.nanmedian(r):.2f})",
                    ),
                    f"{label}Correlation",
                    ".png",
                )
        rows = [
            ("model", meta.get("Model")),
            ("direction", direction),
            ("model file", meta.get("ModelFile")),
            ("alignment", meta.get("Alignment")),
            ("MC-dropout samples", meta.get("MCDropoutSamples")),
            ("includes training data", meta.get("IncludesTrainingData")),
        ]
        rows += [
            (k, f"{v:.3f}" if isinstance(v, float) else v)
            for k, v in metrics.items()
            if k
            in (
                "spearman_minute",
                "spearman_second",
                "pearson_minute",
                "pearson_second",
                "rmse",
                "n_minute_windows",
                "n_second_windows",
            )
        ]
        if target is None:
            rows.append(("metrics", "none: this run has no measured target"))
        written.append(
            str(write_text(folder / figure_name(ents, f"{label}Metrics", suffix, ".html"), _table_html(rows)))
        )

        card, card_path = _model_card(output_dir, meta.get("ModelFile"))
        if card_path is None or (label, direction) in done_models:
            continue
        done_models.add((label, direction))
        sub_ents = {"subject": subject}
        stem = card_path.name.removesuffix("_model.json")
        base = card_path.parent
        interp = _read_json(base / f"{stem}_interpretation.json")
        params_path = base / f"{stem}_desc-hrfParameters_interpretation.tsv"
        if interp.get("hrf_curves"):
            _save(
                F.hrf_figure(
                    np.asarray(interp["hrf_curves"]),
                    np.asarray(interp["hrf_time_s"]),
                    read_tsv(params_path) if params_path.is_file() else None,
                    title=f"{label} ({direction}): learned HRFs",
                ),
                f"{label}Hrf",
                _ents=sub_ents,
            )
        wav = base / f"{stem}_desc-waveletAttention_interpretation.tsv"
        if wav.is_file():
            per_node = base / f"{stem}_desc-waveletAttentionPerNode_interpretation.tsv"
            _save(
                F.wavelet_figure(
                    read_tsv(wav),
                    read_tsv(per_node) if per_node.is_file() else None,
                    title=f"{label} ({direction}): wavelet attention",
                ),
                f"{label}Wavelet",
                _ents=sub_ents,
            )
        written.append(
            str(
                write_text(
                    folder / figure_name(sub_ents, f"{label}Methods", suffix, ".html"),
                    model_methods_html(card),
                )
            )
        )
    return written


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------
#: (desc pattern, section, title, caption) in report order; ``{m}`` is the model label.
REPORTLETS = [
    (r"summary", "Summary", "Run summary", None),
    (
        r"psd",
        "EEG/MEG",
        "Power spectra",
        "Welch power spectral density of every channel, raw (left) and after preprocessing (right); "
        "the median "
        "channel in black, bad channels in red, notch frequencies dotted, band-pass edges dashed.",
    ),
    (
        r"badchannels",
        "EEG/MEG",
        "Bad channels",
        "The bad-channel criteria per channel (PREP-style): robust z-score of the log amplitude and "
        "the highest "
        "absolute correlation with another channel; thresholds dashed, bad channels in red.",
    ),
    (
        r"mrartifacts",
        "EEG/MEG",
        "MR artifact correction",
        "Spectra and a 2 s trace before and after the gradient / ballistocardiogram correction.",
    ),
    (
        r"carpet",
        "fMRI",
        "Carpet plot",
        "nilearn carpet plot of the fMRIPrep BOLD in the brain mask (z-scored, detrended) and, below, the "
        "confound-regressed parcel series on the common timeline (networks separated by lines).",
    ),
    (
        r"motion",
        "fMRI",
        "Head motion and framewise displacement",
        "fMRIPrep's motion parameters and framewise displacement; volumes above the threshold are marked.",
    ),
    (r"atlases", "Atlases", "Atlases", "The EEG/MEG and fMRI atlases over the MNI152 template."),
    (
        r"connectivity",
        "Connectivity",
        "Connectivity matrices",
        "Cosine similarity of the mean-centred node series after cropping to the common timeline: EEG/MEG "
        "(left) and fMRI (right).",
    ),
    (
        r"alignment",
        "Alignment",
        "Alignment",
        "Both recordings on the EEG/MEG clock (the kept overlap shaded) and the spacing of the scanner "
        "volume "
        "triggers minus the TR.",
    ),
    (
        r"(?P<m>[a-zA-Z0-9]+?)Metrics",
        "Model: {m}",
        "Prediction metrics",
        "Whole-run prediction scored against the measured target (Spearman/Pearson averaged over nodes in "
        "60 s and 15 s windows).",
    ),
    (
        r"(?P<m>[a-zA-Z0-9]+?)Prediction",
        "Model: {m}",
        "Predicted and measured series",
        "Predicted (blue; band: Monte-Carlo dropout s.d.) and measured (black) series, z-scored, for the "
        "best, median and worst predicted nodes.",
    ),
    (
        r"(?P<m>[a-zA-Z0-9]+?)Correlation",
        "Model: {m}",
        "Correlation map",
        "Pearson correlation of the predicted and measured series of each parcel, on the MNI152 template.",
    ),
    (
        r"(?P<m>[a-zA-Z0-9]+?)Hrf",
        "Model: {m}",
        "Learned hemodynamic response functions",
        "The HRF the model learned for each source node and its six double-gamma parameters per node.",
    ),
    (
        r"(?P<m>[a-zA-Z0-9]+?)Wavelet",
        "Model: {m}",
        "Wavelet attention",
        "Softmax attention over the wavelet scales (frequency bands), overall and per source node.",
    ),
    (r"(?P<m>[a-zA-Z0-9]+?)Methods", "Model: {m}", "Model methods", None),
    (r"methods", "Methods", "Methods boilerplate", None),
]


def _classify(path: Path) -> tuple[int, str, str, str | None] | None:
    desc = _entities(path.name).get("desc")
    if desc is None:
        return None
    for i, (pattern, section, title, caption) in enumerate(REPORTLETS):
        m = re.fullmatch(pattern, desc)
        if m:
            return i, section.format(**m.groupdict()), title, caption
    return None


def _run_label(path: Path) -> str:
    ents = _entities(path.name)
    return " ".join(f"{_SHORT[k]}-{ents[k]}" for k in _RUN_KEYS[1:] if ents.get(k))


def assemble_subject_report(output_dir, subject: str) -> Path:
    """Write ``OUT/sub-<subject>.html`` from the reportlets in ``OUT/sub-<subject>/figures``."""
    import mne

    output_dir = Path(output_dir)
    folder = output_dir / f"sub-{subject}" / "figures"
    items = []
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        if path.suffix not in (".svg", ".png", ".html") or path.name.startswith("."):
            continue
        cls = _classify(path)
        if cls is not None:
            items.append((cls[0], _run_label(path), path, cls))
    items.sort(key=lambda x: (x[3][1] == "Methods", x[3][1].startswith("Model"), x[0], x[1]))
    report = mne.Report(title=f"samba-bids: sub-{subject}", image_format="svg", verbose="error")
    for _, run, path, (_, section, title, caption) in items:
        full_title = f"{title} ({run})" if run else title
        if path.suffix == ".html":
            body = path.read_text()
            if caption:
                body = f"<p>{html.escape(caption)}</p>" + body
            report.add_html(body, title=full_title, section=section)
        else:
            report.add_html(
                figure_html(path, output_dir, full_title, caption), title=full_title, section=section
            )
    crashes = (
        sorted((output_dir / f"sub-{subject}" / "log").rglob("crash-*"))
        if (output_dir / f"sub-{subject}" / "log").is_dir()
        else []
    )
    if crashes:
        report.add_html(
            "<ul>"
            + "".join(f"<li>{html.escape(str(c.relative_to(output_dir)))}</li>" for c in crashes)
            + "</ul>",
            title="Crash files",
            section="Errors",
        )
    return save_report(report, output_dir / f"sub-{subject}.html")


def figure_html(path: Path, report_dir: Path, title: str, caption: str | None = None) -> str:
    """An ``<img>`` of a reportlet, linked by its path relative to the report (as fMRIPrep does:
    the figures stay in ``figures/``, the page references them)."""
    rel = Path(os.path.relpath(path, report_dir)).as_posix()
    cap = (
        f"<figcaption class='figure-caption text-center'>{html.escape(caption)}</figcaption>"
        if caption
        else ""
    )
    return (
        f"<figure class='figure mx-auto d-block'><img class='figure-img img-fluid rounded mx-auto d-block' "
        f"src='{html.escape(rel)}' alt='{html.escape(title)}'>{cap}</figure>"
    )


def save_report(report, path) -> Path:
    """Save an :class:`mne.Report` atomically (a temporary ``.html`` beside it, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.html")
    try:
        report.save(tmp, open_browser=False, overwrite=True, verbose="error")
        # No time stamp: a re-run with the same inputs gives the same bytes (as every output does).
        text = tmp.read_text(encoding="utf-8")
        tmp.write_text(re.sub(r"Created on [0-9: -]+ via", "Created via", text), encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = [
    "REPORTLETS",
    "assemble_subject_report",
    "figure_html",
    "figure_name",
    "model_reportlets",
    "run_reportlets",
    "save_report",
]
