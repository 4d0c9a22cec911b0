"""Column names every model shares: keys, labels, categories and the BTYD summary.

Defined once here; the models, the baselines and serving read them from this module.
"""

from __future__ import annotations

#: Columns that identify a row or hold a label: never features.
KEY_COLUMNS = ("customer_id", "as_of")
LABEL_PREFIXES = ("churned_", "future_spend_", "future_purchases_")
#: Text columns the models read as categories.
CATEGORICAL_FEATURES = ("segment", "preferred_channel")
#: The BTYD summary columns the BG/NBD, Pareto/NBD and Gamma-Gamma models read, in days.
BTYD_INPUTS = ("frequency", "recency", "T", "monetary_value")
#: BG/NBD and Gamma-Gamma work in weeks, as the literature does.
DAYS_PER_WEEK = 7.0


def is_label(column: str) -> bool:
    """Whether ``column`` is a label column (never a feature)."""
    return column.startswith(LABEL_PREFIXES)


class FeatureSchemaError(ValueError):
    """Feature rows that do not match what a model was trained on."""
