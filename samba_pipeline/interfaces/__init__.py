"""samba_pipeline.interfaces"""
