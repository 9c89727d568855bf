"""Enhancement: denoising and super-resolution.

``denoise`` and ``superres`` (the conditional tasks' training pairs), ``sampling`` (what runs
on each batch: SR3 conditional sampling, SDEdit), ``predictor`` (``Denoiser``,
``SuperResolver``), ``figures`` (the before/after picture).
"""
