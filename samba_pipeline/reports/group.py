"""The group report, ``OUT/group.html``: benchmark table and plots, training curves, metrics per
subject, the QC table of every run and the group-mean graphs (figures in ``OUT/group/figures``)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd

from samba_pipeline.bids.derivatives import read_tsv

_STEM = re.compile(r"^(model-[a-zA-Z0-9]+_direction-[a-zA-Z0-9]+)_metrics\.tsv$")


def _table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    return frame.to_html(
        index=False,
        na_rep="n/a",
        float_format=lambda v: floatfmt.format(v),
        classes="table table-sm table-striped",
        border=0,
    )


def build_group_report(output_dir) -> Path:
    """Write the group figures and ``OUT/group.html`` from ``OUT/group`` (whatever it holds)."""
    import mne

    from samba_pipeline.reports import figures as F
    from samba_pipeline.reports.subject import figure_html, save_report

    output_dir = Path(output_dir)
    group = output_dir / "group"
    figs = group / "figures"

    def add_figure(path, title, section, caption=None):
        report.add_html(figure_html(path, output_dir, title, caption), title=title, section=section)

    report = mne.Report(title="samba-bids: group", image_format="svg", verbose="error")
    subjects = sorted(p.name for p in output_dir.glob("sub-*") if p.is_dir())
    links = "".join(
        f"<li><a href='{s}.html'>{s}</a></li>" for s in subjects if (output_dir / f"{s}.html").is_file()
    )
    report.add_html(
        f"<p>{len(subjects)} subject(s) in {html.escape(str(output_dir))}.</p>"
        + (f"<ul>{links}</ul>" if links else ""),
        title="Subjects",
        section="Summary",
    )
    qc = group / "desc-qc_runs.tsv"
    if qc.is_file():
        report.add_html(_table(read_tsv(qc)), title="Quality control of every run", section="Summary")

    stems = sorted(m.group(1) for p in group.glob("model-*_metrics.tsv") if (m := _STEM.match(p.name)))
    if stems:
        bench = pd.concat(
            [read_tsv(group / f"{s}_metrics.tsv").assign(model=s) for s in stems], ignore_index=True
        )
        cols = ["model"] + [c for c in bench.columns if c != "model"]
        report.add_html(
            "<p>Test metrics of every trained model and of the trivial baselines on each withheld "
            "set (Spearman/Pearson averaged over target nodes in 60 s and 15 s windows).</p>"
            + _table(bench[cols]),
            title="Benchmark table",
            section="Benchmark",
        )
    for extra in sorted(group.glob("*desc-benchmark*.tsv")):  # --benchmark: every entry on one split
        report.add_html(_table(read_tsv(extra)), title=extra.stem, section="Benchmark")
    for extra in sorted(group.glob("*desc-benchmark*.svg")):
        add_figure(extra, title=extra.stem, section="Benchmark")
    for stem in stems:
        label = stem.replace("model-", "").replace("_direction-", " ")
        section = f"Model: {label}"
        metrics = read_tsv(group / f"{stem}_metrics.tsv")
        path = F.save_figure(
            F.benchmark_figure(metrics, title=f"{label}: model and baselines on withheld data"),
            figs / f"{stem}_desc-benchmark_metrics.svg",
        )
        add_figure(
            path,
            title="Benchmark",
            section=section,
            caption="Spearman correlation of the model and the baselines per withheld set.",
        )
        history = group / f"{stem}_history.tsv"
        if history.is_file():
            path = F.save_figure(
                F.training_curves_figure(read_tsv(history), title=f"{label}: training curves"),
                figs / f"{stem}_desc-training_history.svg",
            )
            add_figure(
                path,
                title="Training curves",
                section=section,
                caption="Loss on the training and validation windows per epoch.",
            )
        runs = group / f"{stem}_desc-runs_metrics.tsv"
        if runs.is_file():
            table = read_tsv(runs)
            path = F.save_figure(
                F.subject_metrics_figure(table, title=f"{label}: whole-run metrics per subject"),
                figs / f"{stem}_desc-runs_metrics.svg",
            )
            add_figure(
                path,
                title="Metrics per subject",
                section=section,
                caption="Whole-run prediction of every run against its measured target, coloured by "
                "the run's role (training subject, withheld subject).",
            )
            report.add_html(_table(table), title="Metrics per run", section=section)
        card = group / f"{stem}_model.json"
        if card.is_file():
            from samba_pipeline.reports.boilerplate import model_methods_html

            report.add_html(
                model_methods_html(json.loads(card.read_text())), title="Model methods", section=section
            )
        interp = group / f"{stem}_interpretation.json"
        if interp.is_file():
            import numpy as np

            data = json.loads(interp.read_text())
            params = group / f"{stem}_desc-hrfParameters_interpretation.tsv"
            if data.get("hrf_curves"):
                path = F.save_figure(
                    F.hrf_figure(
                        np.asarray(data["hrf_curves"]),
                        np.asarray(data["hrf_time_s"]),
                        read_tsv(params) if params.is_file() else None,
                        title=f"{label}: learned HRFs",
                    ),
                    figs / f"{stem}_desc-hrf_model.svg",
                )
                add_figure(path, title="Learned HRFs", section=section)
        wav = group / f"{stem}_desc-waveletAttention_interpretation.tsv"
        if wav.is_file():
            per = group / f"{stem}_desc-waveletAttentionPerNode_interpretation.tsv"
            path = F.save_figure(
                F.wavelet_figure(
                    read_tsv(wav),
                    read_tsv(per) if per.is_file() else None,
                    title=f"{label}: wavelet attention",
                ),
                figs / f"{stem}_desc-wavelet_model.svg",
            )
            add_figure(path, title="Wavelet attention", section=section)

    for graph in sorted(group.glob("*Groupmean*_relmat.tsv")) + sorted(
        group.glob("*desc-groupmean*_relmat.tsv")
    ):
        table = read_tsv(graph)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 5.2))
        im = F._matrix_panel(ax, table, graph.name.split("_stat-")[0])
        fig.colorbar(im, ax=ax, shrink=0.8, label="mean cosine similarity")
        path = F.save_figure(fig, figs / graph.name.replace("_relmat.tsv", "_relmat.svg"))
        add_figure(path, title=graph.stem, section="Group-mean graphs")
    return save_report(report, output_dir / "group.html")


__all__ = ["build_group_report"]
