"""samba_pipeline.ephys"""
