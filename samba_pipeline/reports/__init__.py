"""samba_pipeline.reports"""
