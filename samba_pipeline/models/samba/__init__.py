"""SAMBA (Afrasiyabi et al., 2024): spatiotemporal alignment of multimodal brain activity.

Modules: :mod:`.hrf` (per-parcel double-gamma HRFs, FFT convolution), :mod:`.wavelet`
(differentiable DWT / inverse DWT on PyWavelets' filters), :mod:`.graph` (sparse cosine graphs,
batched GATv2, region-masked maps) and :mod:`.ele2hemo` (the EEG/MEG -> fMRI model, registered as
the ``samba`` plugin). Importing this package does not import the model module, so the
entry point stays cheap to discover.
"""
