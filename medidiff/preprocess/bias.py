"""N4 bias-field correction (Tustison et al. 2010), SimpleITK's implementation.

The field is fitted on a copy shrunk to about 6 mm voxels (fast, and the field is smooth), then
applied to the full-resolution scan through its log-field.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

FIT_SPACING_MM = 6.0


def n4(image: sitk.Image, head: sitk.Image, iterations=(30, 20, 10)) -> sitk.Image:
    """The bias-corrected ``image`` (float32); ``head`` is a 0/1 mask of where to fit."""
    shrink = [max(1, int(round(FIT_SPACING_MM / s))) for s in image.GetSpacing()]
    small = sitk.Shrink(image, shrink)
    small_mask = sitk.Shrink(sitk.Cast(head, sitk.sitkUInt8), shrink)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    corrected = image / sitk.Exp(log_field)
    return sitk.Cast(corrected, sitk.sitkFloat32)


def head_mask(image: sitk.Image) -> sitk.Image:
    """The head (foreground) of a scan: Otsu threshold of the smoothed scan, holes filled."""
    smooth = sitk.SmoothingRecursiveGaussian(image, 2.0)
    mask = sitk.OtsuThreshold(smooth, 0, 1)
    if np.asarray(sitk.GetArrayViewFromImage(mask)).mean() > 0.95:  # Otsu split the head
        mask = sitk.BinaryThreshold(smooth, 1e-6, 1e30, 1, 0)
    mask = sitk.BinaryMorphologicalClosing(mask, [2, 2, 2])
    return sitk.BinaryFillhole(mask)
