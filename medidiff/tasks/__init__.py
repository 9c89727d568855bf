"""One package per application: what the network learns (``task``), how it is run (predictor).

``medidiff.tasks.registry`` maps a config's ``task`` to its Task object (``get_task``) and loads
a model folder with its task (``load_model``). This package imports nothing eagerly.
"""
