"""Training: labelled sets over several cutoffs, churn and lifetime-value models, MLflow tracking.

Imports :mod:`rapport.features`; never imported by it.
"""
