"""Version and citation metadata for samba-bids."""

__version__ = "0.1.0"
__packagename__ = "samba-bids"
__url__ = "https://github.com/samba-bids/samba-bids"
__citation__ = (
    "samba-bids translates electrophysiology and fMRI with SAMBA "
    "(Afrasiyabi et al., 2024, arXiv:2409.18462) and related models "
    "(Calhas & Henriques)."
)
