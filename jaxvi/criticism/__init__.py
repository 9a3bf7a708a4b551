"""Model criticism: posterior predictive checks and the criticism report of a scvi-hub card
(scvi-tools' ``scvi.criticism``, ``scvi.criticism.create_criticism_report``).

The model cards that show the report are in :mod:`jaxvi.hub`.
"""

from jaxvi.criticism._ppc import (
    DE_COLUMNS,
    METRIC_CALIBRATION,
    METRIC_CV_CELL,
    METRIC_CV_GENE,
    METRIC_DIFF_EXP,
    METRIC_ZERO_FRACTION,
    RAW,
    PosteriorPredictiveCheck,
    calibration_error,
    coefficient_of_variation,
    de_agreement,
    zero_fraction,
)
from jaxvi.criticism._report import (
    METRICS_FILE,
    create_criticism_report,
    cv_scores,
    cv_table,
    de_table,
    metrics_report,
)

__all__ = [
    "METRIC_CALIBRATION",
    "METRIC_CV_CELL",
    "METRIC_CV_GENE",
    "METRIC_DIFF_EXP",
    "METRIC_ZERO_FRACTION",
    "METRICS_FILE",
    "DE_COLUMNS",
    "RAW",
    "PosteriorPredictiveCheck",
    "calibration_error",
    "coefficient_of_variation",
    "create_criticism_report",
    "cv_scores",
    "cv_table",
    "de_agreement",
    "de_table",
    "metrics_report",
    "zero_fraction",
]
