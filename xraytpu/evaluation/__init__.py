"""Evaluating a run: clinical metrics with confidence intervals, the operating point,
reports and plots (single-label in evaluate_lib, multi-label in multilabel).
"""
