"""Report figures as pure functions: data in, a matplotlib figure out (nilearn for brain images).

Every function returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it as
SVG or PNG atomically and closes it. Nothing here reads settings or knows about Nipype.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "samba-bids"  # reproducible SVG element ids
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

#: Voxels above which the carpet plot subsamples the BOLD grid (keeps it to a few seconds).
CARPET_MAX_VOXELS = 20000
_MOTION = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Save ``fig`` (format from the suffix: ``.svg`` or ``.png``) atomically, then close it."""
    from samba_pipeline.bids.derivatives import write_bytes

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(
        buf,
        format=path.suffix.lstrip(".").lower(),
        dpi=dpi,
        bbox_inches="tight",
        metadata={"Date": None} if path.suffix == ".svg" else None,
    )
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def _db(psd: np.ndarray, unit_scale: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 10 * np.log10(np.maximum(psd * unit_scale**2, 1e-30))


def psd_figure(summary: dict[str, Any], *, l_freq=None, h_freq=None, notch_freqs=None, title=""):
    """Spectra of every data channel before and after preprocessing; bad channels in red."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    bads = set(str(b) for b in summary.get("bads_before", [])) | set(
        str(b) for b in summary.get("bad_channels", [])
    )
    scale = 1e6 if all(str(t) == "eeg" for t in summary["before_types"]) else 1.0
    unit = "dB (µV²/Hz)" if scale == 1e6 else "dB (unit²/Hz)"
    fmax = float(summary["after_freqs"][-1])
    for ax, when, label in ((axes[0], "before", "raw recording"), (axes[1], "after", "preprocessed")):
        freqs, psd = summary[f"{when}_freqs"], summary[f"{when}_psd"]
        names = [str(n) for n in summary[f"{when}_names"]]
        sel = freqs <= max(fmax, 1.0)
        db = _db(psd[:, sel], scale)
        for i, name in enumerate(names):
            is_bad = name in bads
            ax.plot(
                freqs[sel],
                db[i],
                lw=1.1 if is_bad else 0.5,
                color="tab:red" if is_bad else "0.55",
                alpha=0.9 if is_bad else 0.5,
                zorder=3 if is_bad else 2,
            )
        ax.plot(freqs[sel], np.median(db, axis=0), color="k", lw=1.6, label="median channel", zorder=4)
        ax.set_title(f"{label} ({len(names)} channels, {float(summary[f'{when}_sfreq']):g} Hz)", fontsize=10)
        ax.set_xlabel("frequency (Hz)")
        ax.grid(alpha=0.3)
    for f in notch_freqs or []:
        if f <= fmax:
            axes[0].axvline(f, color="tab:purple", ls=":", lw=0.8)
    for f, name in ((l_freq, "l_freq"), (h_freq, "h_freq")):
        if f:
            axes[1].axvline(float(f), color="tab:blue", ls="--", lw=0.9, label=f"{name} {float(f):g} Hz")
    axes[0].set_ylabel(unit)
    if bads:
        axes[0].plot([], [], color="tab:red", lw=1.1, label="bad channel(s): " + ", ".join(sorted(bads)[:6]))
        axes[0].legend(fontsize=8, loc="upper right")
    axes[1].legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def bad_channels_figure(channels: pd.DataFrame, *, noisy_z=5.0, correlation=0.4, title=""):
    """The bad-channel criteria per channel (amplitude z-score and neighbour correlation)."""
    n = len(channels)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.22 * n + 2), 4.6), sharex=True)
    x = np.arange(n)
    bad = channels["status"].astype(str).eq("bad").to_numpy()
    colors = np.where(bad, "tab:red", "tab:gray")
    for ax, col, thr, label in (
        (axes[0], "log_std_z", noisy_z, "robust z of log amplitude"),
        (axes[1], "max_abs_corr", correlation, "max |corr| with any channel"),
    ):
        if col in channels:
            vals = pd.to_numeric(channels[col], errors="coerce").to_numpy(float)
            ax.bar(x, np.nan_to_num(vals), color=colors)
            if thr is not None:
                ax.axhline(
                    float(thr) if col == "max_abs_corr" else float(thr), color="tab:red", ls="--", lw=0.8
                )
                if col == "log_std_z":
                    ax.axhline(-float(thr), color="tab:red", ls="--", lw=0.8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(channels["name"].astype(str), rotation=90, fontsize=7)
    n_bad = int(bad.sum())
    reasons = (
        channels.loc[bad, "status_description"].astype(str).tolist()
        if "status_description" in channels
        else []
    )
    names = channels.loc[bad, "name"].astype(str).tolist()
    summary = ", ".join(f"{a} ({b})" for a, b in zip(names, reasons)) if n_bad else "none"
    fig.suptitle((title + "\n" if title else "") + f"bad channels: {summary}", fontsize=9)
    fig.tight_layout()
    return fig


def carpet_figure(
    bold_file,
    mask_file=None,
    *,
    tr: float,
    parcel_series: pd.DataFrame | None = None,
    networks: Sequence[str] | None = None,
    title="",
):
    """nilearn's carpet plot of the BOLD series in the brain mask (subsampled on large grids),
    and beneath it the confound-regressed parcel series."""
    import nibabel as nib
    from nilearn import plotting

    img = nib.load(str(bold_file))
    mask = nib.load(str(mask_file)) if mask_file else None
    n_vox = (
        int(np.asarray(mask.dataobj).astype(bool).sum()) if mask is not None else int(np.prod(img.shape[:3]))
    )
    step = 1
    while n_vox / step**3 > CARPET_MAX_VOXELS:
        step += 1
    if step > 1:
        img = img.slicer[::step, ::step, ::step]
        mask = mask.slicer[::step, ::step, ::step] if mask is not None else None
    n_rows = 2 if parcel_series is not None else 1
    fig = plt.figure(figsize=(10, 3.3 * n_rows))
    ax1 = fig.add_subplot(n_rows, 1, 1)
    plotting.plot_carpet(
        img,
        mask_img=mask,
        t_r=tr,
        figure=fig,
        axes=ax1,
        standardize="zscore_sample",
        title=f"BOLD in the brain mask (every {step}. voxel per axis)"
        if step > 1
        else "BOLD in the brain mask",
    )
    if parcel_series is not None:
        ax2 = fig.add_subplot(n_rows, 1, 2)
        data = parcel_series.to_numpy(float).T
        with np.errstate(invalid="ignore"):
            z = (data - np.nanmean(data, axis=1, keepdims=True)) / np.nanstd(data, axis=1, keepdims=True)
        n_t = z.shape[1]
        ax2.imshow(
            np.nan_to_num(z),
            aspect="auto",
            cmap="gray",
            vmin=-2,
            vmax=2,
            interpolation="nearest",
            extent=(0, n_t * tr, z.shape[0], 0),
        )
        ax2.set_xlabel("time (s) on the common timeline")
        ax2.set_ylabel("parcel")
        ax2.set_title(f"confound-regressed parcel series ({z.shape[0]} parcels, z-scored)", fontsize=10)
        if networks is not None and len(networks) == z.shape[0]:
            nets = list(networks)
            starts = [i for i in range(len(nets)) if i == 0 or nets[i] != nets[i - 1]]
            for s in starts[1:]:
                ax2.axhline(s, color="tab:orange", lw=0.6)
            ax2.set_yticks([s + 0.5 for s in starts])
            ax2.set_yticklabels([nets[s] for s in starts], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def motion_figure(confounds: pd.DataFrame, *, tr: float, fd_threshold: float, title=""):
    """Head motion (translations, rotations) and framewise displacement with its threshold."""
    fig, axes = plt.subplots(3, 1, figsize=(10, 5.6), sharex=True)
    t = np.arange(len(confounds)) * tr
    for ax, cols, unit in ((axes[0], _MOTION[:3], "mm"), (axes[1], _MOTION[3:], "rad")):
        for c in cols:
            if c in confounds:
                ax.plot(t, pd.to_numeric(confounds[c], errors="coerce"), lw=0.9, label=c)
        ax.set_ylabel(unit)
        ax.legend(fontsize=7, ncol=3, loc="upper right")
        ax.grid(alpha=0.3)
    if "framewise_displacement" in confounds:
        fd = pd.to_numeric(confounds["framewise_displacement"], errors="coerce").to_numpy(float)
        high = np.nan_to_num(fd) > fd_threshold
        axes[2].plot(t, fd, color="k", lw=0.9, label=f"FD (mean {np.nanmean(fd):.3f} mm)")
        axes[2].axhline(
            fd_threshold,
            color="tab:red",
            ls="--",
            lw=0.8,
            label=f"threshold {fd_threshold:g} mm ({int(high.sum())} volumes above)",
        )
        axes[2].scatter(t[high], fd[high], color="tab:red", s=10, zorder=3)
        axes[2].legend(fontsize=7, loc="upper right")
    axes[2].set_ylabel("FD (mm)")
    axes[2].set_xlabel("time (s) from the first volume")
    axes[2].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def atlas_figure(atlases: Sequence[tuple[str, Any]], title=""):
    """Each atlas (label, dseg image) over nilearn's MNI152 template, six axial slices."""
    from nilearn import datasets, plotting

    template = datasets.load_mni152_template(resolution=2)
    fig = plt.figure(figsize=(11, 2.3 * len(atlases)))
    for i, (label, image) in enumerate(atlases):
        ax = fig.add_subplot(len(atlases), 1, i + 1)
        plotting.plot_roi(
            str(image),
            bg_img=template,
            display_mode="z",
            cut_coords=6,
            axes=ax,
            figure=fig,
            draw_cross=False,
            title=label,
            cmap="gist_ncar",
            alpha=0.7,
            annotate=False,
            black_bg=False,
        )
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _matrix_panel(ax, table: pd.DataFrame, title: str, networks: Sequence[str] | None = None):
    names = [str(n) for n in table["Node"]] if "Node" in table else [str(c) for c in table.columns]
    mat = table.drop(columns=["Node"], errors="ignore").to_numpy(float)
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_title(f"{title} ({len(names)} nodes)", fontsize=10)
    if len(names) <= 40:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=5)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=5)
    elif networks is not None and len(networks) == len(names):
        nets = list(networks)
        starts = [i for i in range(len(nets)) if i == 0 or nets[i] != nets[i - 1]]
        ax.set_yticks(starts)
        ax.set_yticklabels([nets[s] for s in starts], fontsize=6)
        ax.set_xticks([])
        for s in starts[1:]:
            ax.axhline(s - 0.5, color="k", lw=0.4)
            ax.axvline(s - 0.5, color="k", lw=0.4)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return im


def connectivity_figure(
    ephys: pd.DataFrame,
    fmri: pd.DataFrame,
    *,
    ephys_label="EEG/MEG",
    fmri_networks: Sequence[str] | None = None,
    title="",
):
    """The two cosine-similarity graphs side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    _matrix_panel(axes[0], ephys, f"{ephys_label} graph")
    im = _matrix_panel(axes[1], fmri, "fMRI graph", fmri_networks)
    fig.colorbar(im, ax=list(axes), shrink=0.7, label="cosine similarity")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def alignment_figure(alignment: dict, events: pd.DataFrame | None, *, title=""):
    """Timeline of both recordings (the kept overlap shaded) and the volume-trigger spacing."""
    has_triggers = alignment.get("method") == "triggers" and events is not None and len(events)
    fig, axes = plt.subplots(
        2 if has_triggers else 1, 1, figsize=(10, 4.4 if has_triggers else 2.2), squeeze=False
    )
    ax = axes[0, 0]
    tr = float(alignment.get("tr") or alignment.get("repetition_time") or 1.0)
    offset = float(alignment.get("offset_s", 0.0))
    sfreq = float(alignment.get("ephys_sfreq") or 1.0)
    ephys_dur = float(alignment.get("n_ephys_samples", 0)) / sfreq
    n_vol = int(alignment.get("n_volumes", 0))
    ax.broken_barh([(0, ephys_dur)], (1.6, 0.8), color="tab:blue", alpha=0.6)
    ax.broken_barh([(offset, n_vol * tr)], (0.6, 0.8), color="tab:green", alpha=0.6)
    start = float(alignment.get("ephys_start_sample", 0)) / sfreq
    stop = float(alignment.get("ephys_stop_sample", 0)) / sfreq
    ax.axvspan(
        start,
        stop,
        color="tab:orange",
        alpha=0.2,
        label=f"kept overlap: {alignment.get('n_volumes_kept')} volumes, {stop - start:.1f} s",
    )
    ax.set_yticks([1.0, 2.0])
    ax.set_yticklabels(["fMRI", "EEG/MEG"])
    ax.set_xlabel("time (s) on the EEG/MEG clock")
    ax.set_title(f"{alignment.get('method', '')}: fMRI volume 0 at {offset:.3f} s", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    if has_triggers:
        names = set(alignment.get("trigger_names") or [])
        desc = (
            events["description"].astype(str) if "description" in events else events["trial_type"].astype(str)
        )
        onsets = np.sort(events.loc[desc.isin(names), "onset"].to_numpy(float))
        ax2 = axes[1, 0]
        if onsets.size > 1:
            dev_ms = (np.diff(onsets) - tr) * 1000
            ax2.plot(np.arange(1, onsets.size), dev_ms, marker=".", lw=0.6, ms=3)
            ax2.set_title(f"{onsets.size} volume triggers: spacing minus TR ({tr:g} s)", fontsize=10)
        ax2.axhline(0, color="k", lw=0.6)
        ax2.set_ylabel("ms")
        ax2.set_xlabel("trigger")
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def parcel_correlations(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson correlation per row of two ``[n_nodes, n_samples]`` arrays (NaN where undefined)."""
    n = min(pred.shape[1], target.shape[1])
    a, b = pred[:, :n].astype(float), target[:, :n].astype(float)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - np.nanmean(b, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def representative_nodes(r: np.ndarray, k: int = 3) -> list[int]:
    """Indices of the best, median and worst predicted nodes (by correlation)."""
    order = [i for i in np.argsort(-np.nan_to_num(r, nan=-np.inf)) if np.isfinite(r[i])]
    if not order:
        return list(range(min(k, len(r))))
    picks = [order[0], order[len(order) // 2], order[-1]][:k]
    return list(dict.fromkeys(picks))


def prediction_figure(
    pred: pd.DataFrame,
    target: pd.DataFrame | None,
    *,
    sfreq: float,
    std: pd.DataFrame | None = None,
    nodes: Sequence[str] | None = None,
    title="",
):
    """Predicted against measured series (z-scored) for representative nodes."""
    names = [str(c) for c in pred.columns]
    p = pred.to_numpy(float).T
    r = None
    if target is not None:
        t = target[[c for c in names if c in target.columns]].to_numpy(float).T
        r = parcel_correlations(p, t)
    roles: dict[str, str] = {}
    if nodes is None:
        picks = representative_nodes(r) if r is not None else list(np.argsort(-p.std(axis=1))[:3])
        nodes = [names[i] for i in picks]
        tags = ("best", "median", "worst") if r is not None else ("most variable",) * 3
        roles = {n: t for n, t in zip(nodes, tags)}
    fig, axes = plt.subplots(len(nodes), 1, figsize=(10, 1.9 * len(nodes) + 0.6), sharex=True, squeeze=False)
    time = np.arange(p.shape[1]) / sfreq
    for ax, name in zip(axes[:, 0], nodes):
        i = names.index(name)
        mu, sd = p[i].mean(), p[i].std() or 1.0
        ax.plot(time, (p[i] - mu) / sd, color="tab:blue", lw=1.1, label="predicted")
        if std is not None and name in std:
            s = std[name].to_numpy(float) / sd
            ax.fill_between(
                time,
                (p[i] - mu) / sd - s,
                (p[i] - mu) / sd + s,
                color="tab:blue",
                alpha=0.2,
                label="± MC-dropout s.d.",
            )
        label = name
        if target is not None and name in target:
            y = target[name].to_numpy(float)[: len(time)]
            ax.plot(
                time[: len(y)],
                (y - np.nanmean(y)) / (np.nanstd(y) or 1.0),
                color="k",
                lw=1.0,
                label="measured",
            )
            label += f"   r = {r[i]:.2f}"
        if name in roles:
            label = f"{roles[name]}: {label}"
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_ylabel("z")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper right", ncol=3)
    axes[-1, 0].set_xlabel("time (s) on the common timeline")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def paint(values: np.ndarray, names: Sequence[str], atlas_image, atlas_table):
    """A 3-D image on the atlas grid: each parcel's voxels get its value (NaN / 0 elsewhere)."""
    import nibabel as nib

    img = nib.load(str(atlas_image))
    labels = np.asarray(img.dataobj).astype(np.int64)
    table = pd.read_csv(atlas_table, sep="\t")
    by_name = {str(n): int(i) for i, n in zip(table["index"], table["name"])}
    lut = np.zeros(int(labels.max()) + 1, dtype=np.float32)
    for name, value in zip(names, values):
        index = by_name.get(str(name))
        if index is not None and 0 < index < lut.size and np.isfinite(value):
            lut[index] = value
    return nib.Nifti1Image(lut[labels], img.affine)


def brain_map_figure(
    values: np.ndarray,
    names: Sequence[str],
    atlas_image,
    atlas_table,
    *,
    label: str,
    symmetric: bool = True,
    title="",
):
    """Per-parcel values painted on the atlas, over nilearn's MNI152 template."""
    from nilearn import datasets, plotting

    img = paint(np.asarray(values, float), names, atlas_image, atlas_table)
    finite = np.asarray(values, float)[np.isfinite(values)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    fig = plt.figure(figsize=(11, 2.6))
    plotting.plot_stat_map(
        img,
        bg_img=datasets.load_mni152_template(resolution=2),
        display_mode="z",
        cut_coords=6,
        figure=fig,
        cmap="RdBu_r" if symmetric else "viridis",
        vmax=vmax or 1.0,
        symmetric_cbar=symmetric,
        colorbar=True,
        draw_cross=False,
        annotate=False,
        black_bg=False,
        title=title or label,
        threshold=1e-6,
    )
    return fig


def hrf_figure(curves: np.ndarray, time_s: np.ndarray, parameters: pd.DataFrame | None, *, title=""):
    """Learned HRF curves (one per source node; the mean in black) and the HRF parameters per node."""
    n_rows = 2 if parameters is not None and len(parameters) else 1
    fig = plt.figure(figsize=(11, 3.2 * n_rows))
    ax = fig.add_subplot(n_rows, 1, 1)
    curves = np.asarray(curves, float)
    time_s = np.asarray(time_s, float)
    ax.plot(time_s, curves.T, color="tab:blue", lw=0.5, alpha=0.4)
    ax.plot(time_s, curves.mean(axis=0), color="k", lw=1.8, label=f"mean of {curves.shape[0]} nodes")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("response")
    ax.set_title("learned hemodynamic response functions", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if n_rows == 2:
        ax2 = fig.add_subplot(2, 1, 2)
        params = parameters.set_index(parameters.columns[0])
        values = params.apply(pd.to_numeric, errors="coerce").to_numpy(float).T
        with np.errstate(invalid="ignore"):
            z = (values - np.nanmean(values, axis=1, keepdims=True)) / (
                np.nanstd(values, axis=1, keepdims=True) + 1e-12
            )
        im = ax2.imshow(z, aspect="auto", cmap="RdBu_r", vmin=-2.5, vmax=2.5, interpolation="nearest")
        ax2.set_yticks(range(len(params.columns)))
        ax2.set_yticklabels(
            [
                f"{c} ({np.nanmean(values[i]):.3g} ± {np.nanstd(values[i]):.2g})"
                for i, c in enumerate(params.columns)
            ],
            fontsize=7,
        )
        if len(params.index) <= 64:
            ax2.set_xticks(range(len(params.index)))
            ax2.set_xticklabels([str(n) for n in params.index], rotation=90, fontsize=6)
        ax2.set_title(
            "HRF parameters per source node (z-scored across nodes; mean ± s.d. in the labels)", fontsize=10
        )
        fig.colorbar(im, ax=ax2, shrink=0.8, label="z")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def wavelet_figure(scales: pd.DataFrame, per_node: pd.DataFrame | None = None, *, title=""):
    """Attention weight per wavelet scale (with its frequency band) and per source node."""
    n_cols = 2 if per_node is not None and len(per_node) else 1
    fig, axes = plt.subplots(1, n_cols, figsize=(11 if n_cols == 2 else 6, 3.6), squeeze=False)
    ax = axes[0, 0]
    labels = [
        f"{s}\n{lo:g}-{hi:g} Hz" if "band_low_hz" in scales else str(s)
        for s, lo, hi in zip(
            scales["scale"],
            scales.get("band_low_hz", scales["scale"]),
            scales.get("band_high_hz", scales["scale"]),
        )
    ]
    ax.bar(range(len(scales)), scales["weight"].to_numpy(float), color="tab:purple")
    ax.axhline(1.0 / len(scales), color="k", ls="--", lw=0.8, label="uniform")
    ax.set_xticks(range(len(scales)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("attention weight")
    ax.set_title("wavelet attention per scale", fontsize=10)
    ax.legend(fontsize=8)
    if n_cols == 2:
        node_col = per_node.columns[0]
        mat = per_node.drop(columns=[node_col]).to_numpy(float)
        im = axes[0, 1].imshow(mat.T, aspect="auto", cmap="viridis", interpolation="nearest")
        axes[0, 1].set_yticks(range(mat.shape[1]))
        axes[0, 1].set_yticklabels([str(c) for c in per_node.columns[1:]], fontsize=7)
        if len(per_node) <= 64:
            axes[0, 1].set_xticks(range(len(per_node)))
            axes[0, 1].set_xticklabels(per_node[node_col].astype(str), rotation=90, fontsize=6)
        axes[0, 1].set_title("per source node", fontsize=10)
        fig.colorbar(im, ax=axes[0, 1], shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def training_curves_figure(history: pd.DataFrame, *, title=""):
    """Training and validation loss per epoch; the best epoch marked."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(history["epoch"], history["train_loss"], marker=".", label="training")
    if "val_loss" in history:
        ax.plot(history["epoch"], history["val_loss"], marker=".", label="validation")
        best = history["val_loss"].astype(float).idxmin()
        ax.axvline(
            history.loc[best, "epoch"],
            color="k",
            ls=":",
            lw=0.8,
            label=f"best epoch {int(history.loc[best, 'epoch'])}",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def benchmark_figure(
    metrics: pd.DataFrame, *, metric_columns=("spearman_minute", "spearman_second"), title=""
):
    """Test metrics of every predictor (models and baselines) per withheld set."""
    cols = [c for c in metric_columns if c in metrics and metrics[c].notna().any()]
    sets = list(dict.fromkeys(metrics["test_set"].astype(str)))
    fig, axes = plt.subplots(1, max(1, len(cols)), figsize=(5.5 * max(1, len(cols)), 3.8), squeeze=False)
    predictors = list(dict.fromkeys(metrics["predictor"].astype(str)))
    width = 0.8 / max(1, len(predictors))
    for ax, col in zip(axes[0], cols):
        for j, pred in enumerate(predictors):
            rows = metrics[metrics["predictor"].astype(str) == pred].set_index("test_set")
            vals = [float(rows[col].get(s, np.nan)) if s in rows.index else np.nan for s in sets]
            ax.bar(np.arange(len(sets)) + j * width, np.nan_to_num(vals), width, label=pred)
        ax.set_xticks(np.arange(len(sets)) + width * (len(predictors) - 1) / 2)
        ax.set_xticklabels([s.replace("_", " ") for s in sets], fontsize=8)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(col.replace("_", " "), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def subject_metrics_figure(runs: pd.DataFrame, *, columns=("spearman_minute", "spearman_second"), title=""):
    """Whole-run metrics of every subject's prediction, coloured by the run's role in training."""
    cols = [c for c in columns if c in runs and runs[c].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(cols)), figsize=(5.5 * max(1, len(cols)), 3.4), squeeze=False)
    roles = list(dict.fromkeys(runs.get("role", pd.Series(["run"] * len(runs))).astype(str)))
    palette = dict(zip(roles, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, col in zip(axes[0], cols):
        colors = [palette[str(r)] for r in runs.get("role", pd.Series(["run"] * len(runs)))]
        ax.bar(range(len(runs)), runs[col].to_numpy(float), color=colors)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(runs["run"].astype(str), rotation=45, ha="right", fontsize=7)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(col.replace("_", " "), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for role, color in palette.items():
        axes[0, 0].bar([], [], color=color, label=role)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


__all__ = [
    "alignment_figure",
    "atlas_figure",
    "bad_channels_figure",
    "benchmark_figure",
    "brain_map_figure",
    "carpet_figure",
    "connectivity_figure",
    "hrf_figure",
    "motion_figure",
    "parcel_correlations",
    "prediction_figure",
    "psd_figure",
    "representative_nodes",
    "save_figure",
    "subject_metrics_figure",
    "training_curves_figure",
    "wavelet_figure",
]
