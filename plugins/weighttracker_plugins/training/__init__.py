"""Training-loop integrations: TensorBoard logging and a Lightning callback.

Each lives in its own module and imports its library only when that module is imported,
so ``weighttracker`` works without TensorBoard or Lightning installed::

    from weighttracker_plugins.training.tensorboard import TensorBoardLogger
    from weighttracker_plugins.training.lightning import WeightTrackerCallback

Nothing is imported here.
"""
