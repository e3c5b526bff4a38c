"""samba_pipeline.fmri"""
