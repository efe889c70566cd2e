"""Session fixtures with synthetic raw ScanNet / S3DIS data (owned by the synthetic-data work)."""
