"""Post-processing: probability map -> region restriction -> global threshold -> labels -> spheres -> repair.

Every step is a plain function on arrays and tables (axis order z, y, x; voxel sizes in Å, user-facing
lengths in nm). Each returns, next to its result, a rejected-vesicles table (columns id, z, y, x, radius,
step, reason) so that nothing disappears silently.
"""

import importlib
from typing import Any

# The steps' modules load on first use (PEP 562): the model registry needs only the threshold grid,
# and importing every step (scipy.stats, scikit-image) cost ~1.2 s before the network could start.
_WHERE = {
    "REJECTED_COLUMNS": "_common", "concat_rejected": "_common", "label_vesicles": "adaptive",
    "restrict_probability": "masks", "vesicles_in_region": "masks", "mahalanobis_test": "outliers",
    "repair": "outliers", "resolve_overlaps": "outliers", "FitOptions": "spheres", "SphereFit": "spheres",
    "fit_sphere": "spheres", "fit_spheres": "spheres", "initial_spheres": "spheres", "table_from_fits": "spheres",
    "ThresholdResult": "threshold", "global_threshold": "threshold",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cryoves.postprocess' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cryoves.postprocess.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


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
