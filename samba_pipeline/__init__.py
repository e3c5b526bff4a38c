"""samba-bids: translate brain activity between EEG/MEG and fMRI as a BIDS App."""

from samba_pipeline.__about__ import __version__

__all__ = ["__version__"]
