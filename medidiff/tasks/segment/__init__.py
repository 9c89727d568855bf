"""Segmentation with a conditional diffusion model and its ensemble uncertainty.

``task`` (label codes, training pairs, fusion, entropy), ``predictor`` (``Segmenter``),
``evaluation`` (Dice, HD95, the uncertainty's error AUROC), ``figures`` (the label overlay).
"""
