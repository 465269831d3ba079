"""Training a run: the loop (train_lib), its callbacks, the distribution strategies and
the multi-label loss and metrics.
"""
