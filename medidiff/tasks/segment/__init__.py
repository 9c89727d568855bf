"""Segmentation with a conditional diffusion model and its ensemble uncertainty.

``task`` (label codes, training pairs, fusion, entropy), ``predictor`` (``Segmenter``,
``foreground_grid``), ``baselines`` (a supervised U-Net run the same way, multi-Otsu),
``evaluation`` (Dice, HD95, the uncertainty's error AUROC), ``figures`` (the label overlay).
"""
