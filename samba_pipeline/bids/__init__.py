"""samba_pipeline.bids"""
