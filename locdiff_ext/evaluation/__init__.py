"""Layer 3, how good is a prediction: the metrics of design.md section 2 and their tables, paired
bootstrap intervals between methods (``metrics``), and the baselines every benchmark compares
LocDiff with, on the same embeddings (``baselines``: kNN retrieval, grid classification,
unit-vector regression, and the LocDiff-H hybrid), and credible regions of probability maps and their
calibration (``calibration``).  Imports ``checks`` and ``kernels`` only
(a LocDiff is passed in, never imported)."""

from .baselines import (GridClassifier, KNNRetrieval, UnitVectorRegressor, compare_methods, fit_baselines, locdiff_h,
                        method_predictions)
from .calibration import (LEVELS, calibration_table, cell_areas_km2, coverage, credible_area_km2, credible_region,
                          coverage_gap, fit_sharpness, region_contains, reliability_levels, sharpen,
                          truth_mass)
from .metrics import (THRESHOLDS_KM, geolocation_metrics, great_circle_km, markdown_table, paired_bootstrap,
                      paired_table, write_report)

__all__ = ["LEVELS", "calibration_table", "reliability_levels", "cell_areas_km2", "coverage", "credible_area_km2", "credible_region", "region_contains",
           "sharpen", "truth_mass", "coverage_gap", "fit_sharpness",
           "THRESHOLDS_KM", "geolocation_metrics", "great_circle_km", "paired_bootstrap", "markdown_table",
           "paired_table", "write_report", "KNNRetrieval", "GridClassifier", "UnitVectorRegressor", "locdiff_h",
           "fit_baselines", "method_predictions", "compare_methods"]
