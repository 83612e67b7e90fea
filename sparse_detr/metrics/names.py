"""The names of the metrics the package computes, without the code that computes them (no torch),
so that config checks (`sparse-detr-report metrics=...`) can list them."""

# COCO detection metrics, in the order of COCOeval.stats after summarize().
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
CLASS_AP = "AP_class"   # per-class AP keys: "AP_class/<category name>"

# Attention sparsity statistics per site, layer and head (metrics/sparsity.py).
# The grid ones (metrics/regions.py) exist only at sites whose keys are the feature map.
GRID_METRICS = ("regions", "largest_region_share")
SPARSITY_METRICS = ("zero_ratio", "near_zero_ratio", "gini", "support", "entropy", *GRID_METRICS)
