"""samba_pipeline.cli"""
