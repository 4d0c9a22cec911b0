"""Point-in-time customer features: data contracts, datasets, RFM + interaction features, labels.

This package is the bottom layer of Rapport: it imports neither :mod:`rapport.training`
nor :mod:`rapport.serving`.
"""
