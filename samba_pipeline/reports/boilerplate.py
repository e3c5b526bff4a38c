"""The methods boilerplate: a citable description of what samba-bids did, from the settings used.

Like fMRIPrep's ``CITATION.md``, the text is written from the :class:`samba_pipeline.config.Settings`
of the run (atlases, confound strategy, filters, EEG/MEG options) and, for trained or applied
models, from the model card (model settings, training settings). Citations are numbered
``[n]`` and listed under *References*.
"""

from __future__ import annotations

import html
from importlib import metadata
from typing import Any

REFERENCES = {
    "samba": "Afrasiyabi, A., Bhaskar, D., Busch, E. L., Caplette, L., Singh, R., Lajoie, G., "
    "Turk-Browne, N. B. & Krishnaswamy, S. (2024). Latent representation learning for "
    "multimodal brain activity translation. arXiv:2409.18462.",
    "nipype": "Gorgolewski, K. et al. (2011). Nipype: a flexible, lightweight and extensible "
    "neuroimaging data processing framework in Python. Front. Neuroinform. 5:13. "
    "doi:10.3389/fninf.2011.00013",
    "mne": "Gramfort, A. et al. (2013). MEG and EEG data analysis with MNE-Python. Front. Neurosci. "
    "7:267. doi:10.3389/fnins.2013.00267",
    "mnebids": "Appelhoff, S. et al. (2019). MNE-BIDS: organizing electrophysiological data into "
    "the BIDS format and facilitating their analysis. J. Open Source Softw. 4(44):1896. "
    "doi:10.21105/joss.01896",
    "prep": "Bigdely-Shamlo, N. et al. (2015). The PREP pipeline: standardized preprocessing for "
    "large-scale EEG analysis. Front. Neuroinform. 9:16. doi:10.3389/fninf.2015.00016",
    "aas": "Allen, P. J., Josephs, O. & Turner, R. (2000). A method for removing imaging artifact "
    "from continuous EEG recorded during functional MRI. NeuroImage 12(2):230-239. "
    "doi:10.1006/nimg.2000.0599",
    "bcg": "Allen, P. J. et al. (1998). Identification of EEG events in the MR scanner: the problem "
    "of pulse artifact and a method for its subtraction. NeuroImage 8(3):229-239. "
    "doi:10.1006/nimg.1998.0361",
    "eloreta": "Pascual-Marqui, R. D. (2007). Discrete, 3D distributed, linear imaging methods of "
    "electric neuronal activity. Part 1: exact, zero error localization. arXiv:0710.3341.",
    "fmriprep": "Esteban, O. et al. (2019). fMRIPrep: a robust preprocessing pipeline for functional "
    "MRI. Nat. Methods 16:111-116. doi:10.1038/s41592-018-0235-4",
    "nilearn": "Abraham, A. et al. (2014). Machine learning for neuroimaging with scikit-learn. "
    "Front. Neuroinform. 8:14. doi:10.3389/fninf.2014.00014 (nilearn)",
    "satterthwaite": "Satterthwaite, T. D. et al. (2013). An improved framework for confound "
    "regression and filtering for control of motion artifact in the preprocessing "
    "of resting-state functional connectivity data. NeuroImage 64:240-256. "
    "doi:10.1016/j.neuroimage.2012.08.052",
    "compcor": "Behzadi, Y. et al. (2007). A component based noise correction method (CompCor) for "
    "BOLD and perfusion based fMRI. NeuroImage 37(1):90-101. "
    "doi:10.1016/j.neuroimage.2007.04.042",
    "power": "Power, J. D. et al. (2012). Spurious but systematic correlations in functional "
    "connectivity MRI networks arise from subject motion. NeuroImage 59(3):2142-2154. "
    "doi:10.1016/j.neuroimage.2011.10.018",
    "schaefer": "Schaefer, A. et al. (2018). Local-global parcellation of the human cerebral cortex "
    "from intrinsic functional connectivity MRI. Cereb. Cortex 28(9):3095-3114. "
    "doi:10.1093/cercor/bhx179",
    "templateflow": "Ciric, R. et al. (2022). TemplateFlow: FAIR-sharing of multi-scale, multi-species "
    "brain models. Nat. Methods 19:1568-1571. doi:10.1038/s41592-022-01681-2",
    "pytorch": "Paszke, A. et al. (2019). PyTorch: an imperative style, high-performance deep learning "
    "library. NeurIPS 32.",
    "gatv2": "Brody, S., Alon, U. & Yahav, E. (2022). How attentive are graph attention networks? "
    "ICLR 2022. arXiv:2105.14491.",
    "mcdropout": "Gal, Y. & Ghahramani, Z. (2016). Dropout as a Bayesian approximation: representing "
    "model uncertainty in deep learning. ICML 2016. arXiv:1506.02142.",
}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(unknown version)"


class _Citer:
    """Numbers references in the order they are first cited."""

    def __init__(self):
        self.order: list[str] = []

    def __call__(self, *keys: str) -> str:
        nums = []
        for key in keys:
            if key not in self.order:
                self.order.append(key)
            nums.append(str(self.order.index(key) + 1))
        return "[" + ", ".join(nums) + "]"

    def references(self) -> list[str]:
        return [f"[{i + 1}] {REFERENCES[k]}" for i, k in enumerate(self.order)]


def _fmt_hz(value) -> str:
    return "none" if value in (None, 0, "", "none") else f"{float(value):g} Hz"


def _atlas_sentence(spec, cite: _Citer) -> str:
    if spec.is_templateflow:
        text = (
            f"the {spec.name} atlas ({spec.parcels} parcels, {spec.networks} networks) in {spec.template} "
            f"space from TemplateFlow {cite('templateflow')}"
        )
        if spec.name == "Schaefer2018":
            text += f" {cite('schaefer')}"
        return text
    from pathlib import Path

    return f"the atlas {Path(spec.path).name} (a dseg image and its label table given by path)"


def ephys_paragraph(settings, cite: _Citer) -> str:
    from samba_pipeline.ephys.preprocess import EphysSettings

    opts = dict(settings.workflow.ephys or {})
    es = EphysSettings.from_dict(opts)
    types = "/".join(t.upper() for t in es.ch_types)
    parts = [
        f"The {types} recordings were read with MNE-BIDS {_version('mne-bids')} {cite('mnebids')} and "
        f"preprocessed with MNE-Python {_version('mne')} {cite('mne')}."
    ]
    mr = []
    if es.gradient_correction is not False:
        mr.append(
            f"MR gradient artifacts were removed by average artifact subtraction locked to the scanner "
            f"volume triggers {cite('aas')} (sliding template of {es.artifact_template_epochs} volumes, "
            f"{es.gradient_upsample}x upsampling; gradient_correction = {es.gradient_correction})"
        )
    if es.bcg_correction is not False:
        mr.append(
            f"the ballistocardiogram by subtracting a template locked to the R peaks of the ECG "
            f"{cite('bcg')} (bcg_correction = {es.bcg_correction})"
        )
    if mr:
        parts.append(
            "Before any filtering, " + ", then ".join(mr) + '; with "auto" a correction runs '
            "only when the artifact-locked mean explains more than 10% of the variance."
        )
    notch = es.notch_freq
    notch_text = (
        "at the power-line frequency from the recording's sidecar and its harmonics"
        if notch == "auto"
        else "not applied"
        if notch in (None, "none")
        else f"at {notch} Hz"
    )
    parts.append(
        f"Line noise was removed with notch filters {notch_text} (notch_freq = {notch}); the data were "
        f"resampled to {_fmt_hz(es.raw_resample_sfreq)} (raw_resample_sfreq, polyphase)."
    )
    crit = []
    if es.find_flat_channels:
        crit.append("flat channels")
    if es.find_noisy_channels:
        crit.append(f"noisy channels (robust z-score of the log amplitude above {es.noisy_z_threshold:g})")
    if es.correlation_threshold is not None:
        crit.append(
            f"channels whose correlation with every other channel stays below {es.correlation_threshold:g}"
        )
    if crit:
        parts.append(
            f"Bad channels were detected following the PREP pipeline {cite('prep')}: "
            + ", ".join(crit)
            + "; "
            + (
                "they were interpolated with spherical splines."
                if es.interpolate_bads
                else "they were kept as they are (interpolate_bads = false)."
            )
        )
    parts.append(
        f"The data were band-pass filtered from l_freq = {_fmt_hz(es.l_freq)} to h_freq = "
        f"{_fmt_hz(es.h_freq)} (zero-phase FIR, Hamming window, MNE's automatic transition bands)"
    )
    ref = es.eeg_reference
    if "eeg" in es.ch_types and ref is not None:
        parts[-1] += (
            " and re-referenced to the average of the EEG channels."
            if ref == "average"
            else f" and re-referenced to {', '.join(ref) if not isinstance(ref, str) else ref}."
        )
    else:
        parts[-1] += "."
    if es.space == "source":
        method = es.inverse_method
        head = {
            "sphere": "a three-shell sphere model",
            "bem": "an fsaverage boundary-element model (MEG: the single-shell inner skull; EEG: the "
                   "three-layer BEM)",
        }.get(getattr(es, "head_model", "auto"),
              "an fsaverage boundary-element model where one was available (MEG: the single-shell "
              "inner skull; EEG: the three-layer BEM of a FreeSurfer subjects folder), else a "
              "three-shell sphere model (the model used is recorded as HeadModel in each sidecar)")
        parts.append(
            f"Parcel time courses were computed in source space: the EEG/MEG atlas' voxels (every "
            f"{es.source_spacing:g} mm) on the Colin27 template head with {head}, "
            f"the {method} inverse {cite('eloreta') if method == 'eLORETA' else ''} (SNR {es.inverse_snr:g}, "
            f"depth weighting {es.depth}, noise covariance {es.noise_cov}), and {es.source_extract} "
            f"extraction per parcel of " + _atlas_sentence(settings.workflow.ephys_atlas, cite) + "."
        )
    else:
        parts.append("The EEG/MEG series stay in sensor space (one node per channel).")
    return " ".join(p.replace("  ", " ") for p in parts)


def fmri_paragraph(settings, cite: _Citer) -> str:
    from samba_pipeline.fmri.confounds import STRATEGIES

    wf = settings.workflow
    strategy = STRATEGIES.get(wf.nuisance_regressors)
    desc = strategy.description if strategy else f"the confound set {wf.nuisance_regressors}"
    source = (
        f"The BOLD series preprocessed with fMRIPrep {cite('fmriprep')} in {wf.fmri_space} space"
        if not wf.use_raw_bold
        else f"The raw BOLD series (--use-raw-bold, assumed already in {wf.fmri_space} space; no fMRIPrep)"
    )
    strat_cites = {
        "24P": ("satterthwaite",),
        "36P": ("satterthwaite",),
        "acompcor": ("compcor",),
        "acompcor_gsr": ("compcor",),
    }.get(wf.nuisance_regressors, ())
    parts = [
        f"{source} were denoised with nilearn {_version('nilearn')} {cite('nilearn')}: the confound "
        f"strategy {wf.nuisance_regressors} {cite(*strat_cites) if strat_cites else ''} regressed out "
        f"{desc[0].lower() + desc[1:]}"
    ]
    parts[-1] = parts[-1].rstrip(".") + "."
    hp, lp = wf.high_pass, wf.low_pass
    parts.append(
        f"The series were temporally filtered (high-pass {_fmt_hz(hp)}, low-pass {_fmt_hz(lp)}) and "
        f"averaged within the parcels of "
        + _atlas_sentence(wf.fmri_atlas, cite)
        + f"; parcels with less than {wf.min_coverage:.0%} of their voxels in the brain mask were set "
        f"to n/a, and each parcel series was z-scored."
    )
    parts.append(
        f"Volumes with a framewise displacement {cite('power')} above {wf.fd_threshold:g} mm were "
        "reported as high-motion but kept, so that the timing stays intact."
    )
    return " ".join(p.replace("  ", " ") for p in parts)


def alignment_paragraph(settings) -> str:
    wf = settings.workflow
    if wf.pairing == "simultaneous":
        text = (
            f"EEG/MEG and fMRI were recorded simultaneously; the scanner volume triggers "
            f"({', '.join(wf.volume_trigger[:2])}, ...) placed every fMRI volume on the EEG/MEG clock, and "
            f"both series were cropped to their overlap."
        )
    else:
        text = (
            f"EEG/MEG and fMRI came from different sessions (pairing {wf.pairing}); the onsets of the "
            f"stimulus segments ({', '.join(wf.stimulus_event)}) in both events files gave the offset "
            f"between the recordings (tolerance {wf.stimulus_tolerance:g} s), and both series were cropped "
            "to "
            f"the stimulus."
        )
    windows = ", ".join(f"{float(w):g} s" for w in wf.window_lengths)
    return (
        text + f" Windows of {windows} index the common timeline. Functional-connectivity graphs of "
        "both modalities are the cosine similarities of the mean-centred node series."
    )


def model_paragraph(card: dict[str, Any], cite: _Citer) -> str:
    """What the (trained or applied) model is and how it was trained, from its model card."""
    meta = card.get("Metadata", {})
    dims = card.get("Dims", {})
    cfg = card.get("Config", {})
    plugin = card.get("Plugin", "?")
    direction = dims.get("direction", meta.get("Direction", "?"))
    src, tgt = ("EEG/MEG", "fMRI") if direction == "ephys2fmri" else ("fMRI", "EEG/MEG")
    text = [
        f"The {plugin} translation model ({src} to {tgt}; {dims.get('n_source', '?')} source and "
        f"{dims.get('n_target', '?')} target nodes)"
    ]
    if plugin == "samba":
        text[0] += (
            f" follows SAMBA {cite('samba')}, with the {cfg.get('front_end', 'neurovascular')} front end "
            f"(wavelet {cfg.get('wavelet', '?')}, learned per-node hemodynamic response functions, "
            f"attention over wavelet scales), graph attention (GATv2 {cite('gatv2')}, "
            f"{cfg.get('heads', '?')} heads) on the source and target graphs, region-restricted "
            f"source-to-target maps and an LSTM (hidden size {cfg.get('lstm_hidden', '?')}; dropout "
            f"{cfg.get('dropout', '?')})."
        )
    else:
        text[0] += "."
    ts = meta.get("TrainSettings", {})
    ms = meta.get("ModelSettings", {})
    if ts or ms:
        text.append(
            f"It was trained with PyTorch {cite('pytorch')} on {len(meta.get('Subjects', []))} subject(s) "
            f"({', '.join('sub-' + s for s in meta.get('Subjects', []))}) in windows of "
            f"{dims.get('window_s', ms.get('train_window', '?'))} s (split {ms.get('split', '?')}, withheld "
            f"subjects {', '.join(meta.get('WithheldSubjects', [])) or 'none'}; "
            f"up to {ts.get('epochs', '?')} epochs, "
            f"batch size {ts.get('batch_size', '?')}, learning rate {ts.get('lr', '?')}, "
            "early-stopping patience "
            f"{ts.get('patience', '?')}, seed {meta.get('Seed', ts.get('seed', '?'))}). "
            "It was evaluated with the "
            f"Spearman correlation averaged over nodes in withheld 60 s and 15 s windows {cite('samba')}."
        )
    mc = (ms or {}).get("mc_dropout")
    if mc:
        text.append(
            f"Predictions are the mean of {mc} Monte-Carlo dropout passes {cite('mcdropout')}, "
            "with their standard deviation."
        )
    return " ".join(text)


def methods_text(settings, card: dict[str, Any] | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Methods paragraphs ``[(heading, text), ...]`` and the numbered reference list."""
    cite = _Citer()
    from samba_pipeline.__about__ import __version__

    intro = (
        f"Results included in this report were generated with samba-bids {__version__} {cite('samba')}, "
        f"which is based on Nipype {_version('nipype')} {cite('nipype')}. The boilerplate text below was "
        "generated from the settings of the run, so that it can be copied into a manuscript unchanged."
    )
    paragraphs = [
        ("samba-bids", intro),
        ("EEG/MEG", ephys_paragraph(settings, cite)),
        ("fMRI", fmri_paragraph(settings, cite)),
        ("Alignment and graphs", alignment_paragraph(settings)),
    ]
    if card is not None:
        paragraphs.append(("Translation model", model_paragraph(card, cite)))
    return paragraphs, cite.references()


def _to_html(paragraphs, references) -> str:
    body = "".join(f"<h4>{html.escape(h)}</h4><p>{html.escape(t)}</p>" for h, t in paragraphs)
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in references)
    refs_html = f'<h4>References</h4><ul style="list-style:none">{refs}</ul>'
    return f'<div class="samba-boilerplate">{body}{refs_html}</div>'


def methods_html(settings, card: dict[str, Any] | None = None) -> str:
    return _to_html(*methods_text(settings, card))


def methods_markdown(settings, card: dict[str, Any] | None = None) -> str:
    paragraphs, refs = methods_text(settings, card)
    out = [f"### {h}\n\n{t}\n" for h, t in paragraphs]
    out.append("### References\n\n" + "\n".join(refs) + "\n")
    return "\n".join(out)


def model_methods_html(card: dict[str, Any]) -> str:
    cite = _Citer()
    return _to_html([("Translation model", model_paragraph(card, cite))], cite.references())


__all__ = ["methods_html", "methods_markdown", "methods_text", "model_methods_html", "REFERENCES"]
