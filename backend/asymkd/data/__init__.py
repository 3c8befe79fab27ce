"""Datasets: patch folders, map chips, synthetic world, normalisation, splits, augmentation."""
