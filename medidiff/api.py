"""The public Python API; it mirrors the command line, which is a thin layer over it.

    from medidiff.api import AnomalyDetector, Denoiser, SuperResolver, Segmenter, calibrate
    detector = AnomalyDetector.load("runs/anomaly-model")
    result = detector.predict_file("scan.nii.gz")       # or detector.predict_array(volume, affine)
    result.anomaly_map, result.mask, result.score, result.flagged
    outcomes = detector.predict_files(["scans/"], "results/", num_parts=4, part_id=0)

Every predictor loads a model folder (``load``), predicts a file or an array with its affine,
and runs folders of inputs into an output folder (``predict_files``), as ``medidiff.inference``
describes.
"""

from medidiff.tasks.anomaly.calibration import calibrate
from medidiff.tasks.anomaly.evaluation import evaluate_folder
from medidiff.tasks.anomaly.predictor import AnomalyDetector, AnomalyResult
from medidiff.tasks.enhance.predictor import Denoiser, EnhanceResult, SuperResolver
from medidiff.tasks.segment.predictor import Segmenter, SegmentResult

__all__ = ["AnomalyDetector", "AnomalyResult", "Denoiser", "EnhanceResult", "SegmentResult",
           "Segmenter", "SuperResolver", "calibrate", "evaluate_folder"]
