"""Model criticism: posterior predictive checks (scvi-tools' ``scvi.criticism``).

Reports and model cards built from them are in :mod:`jaxvi.hub.card`.
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

__all__ = [
    "METRIC_CALIBRATION",
    "METRIC_CV_CELL",
    "METRIC_CV_GENE",
    "METRIC_DIFF_EXP",
    "METRIC_ZERO_FRACTION",
    "DE_COLUMNS",
    "RAW",
    "PosteriorPredictiveCheck",
    "calibration_error",
    "coefficient_of_variation",
    "de_agreement",
    "zero_fraction",
]
