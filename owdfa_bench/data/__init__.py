"""Data: protocols on disk -> rows -> datasets, views and samplers."""
