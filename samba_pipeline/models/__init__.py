"""samba_pipeline.models"""
