"""Nipype workflow builders (wiring only, no numerics); installed as ``samba_pipeline.workflows``."""
