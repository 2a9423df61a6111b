"""AnomalySegLib: unsupervised brain anomaly segmentation with attention-constrained VAEs.

Pure-Python core of the AnomalySeg 3D Slicer extension (no Slicer, Qt or VTK imports).
Implements Silva-Rodríguez, Naranjo & Dolz, "Constrained unsupervised anomaly
segmentation", Medical Image Analysis 2022 (AMCons, GradCAMCons) plus a VAE-residual
baseline, and the pipeline around it: volume IO, preprocessing, training, healthy-only
calibration, inference and evaluation.
"""

__version__ = "0.1.0"

#: Version of the model file layout written by :mod:`AnomalySegLib.model.bundle`.
MODEL_FORMAT_VERSION = 1

__all__ = ["__version__", "MODEL_FORMAT_VERSION"]
