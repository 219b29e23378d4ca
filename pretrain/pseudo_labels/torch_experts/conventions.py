"""Expert outputs -> the dense-label conventions of ``pretrain/data/dense`` (NumPy only: the torch
experts and the JAX-side tests both import this file by path).

* depth: float32, > 0 valid, 0 invalid. DPT (MiDaS training) predicts *relative inverse depth*
  (disparity up to an unknown scale and shift), so the depth written is relative: ``1 / inverse``
  divided by its median over the valid pixels, i.e. **the image's median depth is 1**. Pixels whose
  inverse depth is at most ``min_inverse_fraction`` x the median positive inverse depth (sky,
  infinitely far, or negative after resampling) are invalid (0).
* normals: float32 (H, W, 3) unit vectors in the camera frame, x right, y up, z towards the
  viewer; the zero vector = invalid. NLL-AngMF (Bae et al. 2021) predicts normals with x pointing
  *left*, y up and z towards the viewer: its released depth-refinement follow-up (IronDepth, same
  authors, same normal network) intersects them with camera rays (x right, y down, z forward),
  which fixes the frame up to a sign, and its outward normals face the camera; the authors' issue
  tracker reports the same ("OpenGL with the x axis flipped"). So ours = (-x, y, z).
"""

from __future__ import annotations

import numpy as np

# Bae et al.'s frame (x left, y up, z towards the viewer) -> ours (x right, y up, z towards it).
BAE_TO_CAMERA = np.array([-1.0, 1.0, 1.0], np.float32)


def relative_depth(inverse_depth: np.ndarray, min_inverse_fraction: float = 0.01) -> np.ndarray:
    """Relative inverse depth (H, W) -> relative depth (H, W) float32 with median 1 over its
    valid pixels, 0 where invalid (see the module docstring); all 0 when nothing is valid."""
    inverse = np.asarray(inverse_depth, np.float64)
    positive = np.isfinite(inverse) & (inverse > 0)
    depth = np.zeros(inverse.shape, np.float32)
    if not positive.any():
        return depth
    valid = positive & (inverse > min_inverse_fraction * np.median(inverse[positive]))
    metric_free = 1.0 / inverse[valid]
    depth[valid] = (metric_free / np.median(metric_free)).astype(np.float32)
    return depth


def camera_normals(
    bae_normals: np.ndarray, kappa: np.ndarray, min_kappa: float = 0.0
) -> np.ndarray:
    """NLL-AngMF normals (H, W, 3) in Bae et al.'s frame and their concentration ``kappa`` (H, W)
    -> float32 unit normals (H, W, 3) in ours; zero where ``kappa < min_kappa`` or the vector has
    no direction."""
    normals = np.asarray(bae_normals, np.float64) * BAE_TO_CAMERA
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    valid = (length[..., 0] > 1e-6) & (np.asarray(kappa) >= min_kappa)
    unit = np.where(valid[..., None], normals / np.maximum(length, 1e-12), 0.0)
    return unit.astype(np.float32)
