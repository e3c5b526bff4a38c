"""samba_pipeline.simulate"""
