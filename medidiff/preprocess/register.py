"""Rigid and affine registration of a scan to the head template (SimpleITK, Mattes mutual
information, two resolutions, regular sampling with a fixed seed: the same bytes every run
at a fixed thread count; ANTs-style ``Repro`` settings in ITK's own terms)."""

from __future__ import annotations

import SimpleITK as sitk

from medidiff.errors import InputError

# two resolutions of the 2 mm template, 8 and 4 mm: the models work at 3-4 mm, and a third
# level at 2 mm took 2.8x the time for the same brain-mask Dice (0.985) and landmark error
# (0.85 mm) on the raw example data
SHRINK = (4, 2)
SMOOTH_MM = (4.0, 2.0)
SAMPLING = 0.1  # of the template's voxels, on a regular grid


def _method(seed: int) -> sitk.ImageRegistrationMethod:
    seed = max(1, int(seed))  # a seed of 0 means "the wall clock" to ITK
    method = sitk.ImageRegistrationMethod()
    # the metric sums per-thread partial results: one count gives one order, the same bytes
    method.SetNumberOfThreads(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(SAMPLING, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK))
    method.SetSmoothingSigmasPerLevel(list(SMOOTH_MM))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def register(moving: sitk.Image, fixed: sitk.Image, kind: str, seed: int = 1) -> sitk.Transform:
    """The transform mapping template (``fixed``) points to scan (``moving``) points.

    Rigid first, from the images' centres of mass; for ``affine``, an affine stage after it.
    """
    if kind not in ("rigid", "affine"):
        raise InputError(None, f"unknown registration '{kind}'")
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    try:
        method = _method(seed)
        method.SetInitialTransform(initial, inPlace=True)
        method.Execute(fixed, moving)
        rigid = sitk.Euler3DTransform(initial)
        if kind == "rigid":
            return rigid
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        affine.SetCenter(rigid.GetCenter())
        method = _method(seed)
        method.SetInitialTransform(affine, inPlace=True)
        method.Execute(fixed, moving)
        return affine
    except RuntimeError as err:  # ITK raises on degenerate images or a diverged optimiser
        raise InputError(None, f"registration failed ({str(err).splitlines()[-1][:120]})") from None
