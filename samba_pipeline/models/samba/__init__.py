"""SAMBA (Afrasiyabi et al., 2024): spatiotemporal alignment of multimodal brain activity."""
