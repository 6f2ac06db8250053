"""Datasets, readers, augmentation presets, splits and demo data."""
