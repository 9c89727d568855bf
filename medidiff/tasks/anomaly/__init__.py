"""Anomaly detection with a normative diffusion model (AnoDDPM and successors).

``task`` (training behaviour), ``scoring`` (reconstruct from partial noise, residual, filter,
per-scan score), ``baselines`` (z-score, thresholding), ``predictor`` (``AnomalyDetector``),
``calibration`` (thresholds on healthy scans), ``evaluation`` (against lesion masks),
``figures`` (the per-case picture).
"""
