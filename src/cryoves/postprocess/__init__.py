"""Post-processing: probability map -> region restriction -> global threshold -> labels -> spheres -> repair.

Every step is a plain function on arrays and tables (axis order z, y, x; voxel sizes in Å, user-facing
lengths in nm). Each returns, next to its result, a rejected-vesicles table (columns id, z, y, x, radius,
step, reason) so that nothing disappears silently.
"""

from cryoves.postprocess._common import REJECTED_COLUMNS, concat_rejected
from cryoves.postprocess.adaptive import label_vesicles
from cryoves.postprocess.masks import restrict_probability, vesicles_in_region
from cryoves.postprocess.outliers import mahalanobis_test, repair, resolve_overlaps
from cryoves.postprocess.spheres import (
    FitOptions,
    SphereFit,
    fit_sphere,
    fit_spheres,
    initial_spheres,
    table_from_fits,
)
from cryoves.postprocess.threshold import ThresholdResult, global_threshold

__all__ = [
    "REJECTED_COLUMNS",
    "FitOptions",
    "SphereFit",
    "ThresholdResult",
    "concat_rejected",
    "fit_sphere",
    "fit_spheres",
    "global_threshold",
    "initial_spheres",
    "label_vesicles",
    "mahalanobis_test",
    "repair",
    "resolve_overlaps",
    "restrict_probability",
    "table_from_fits",
    "vesicles_in_region",
]
