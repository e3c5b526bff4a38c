"""samba_pipeline.training"""
