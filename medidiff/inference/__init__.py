"""Inference shared by every task: ``predictor`` (the base every task's predictor derives
from: load a model folder, preprocess, predict, write in the input's space), ``grid`` (the one
runner of a network over slices or windows), ``cases`` (input discovery, sharding, resumable
per-case outputs and their table)."""
