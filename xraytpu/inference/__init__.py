"""Calling a trained run: the one model call (model_call), predicting files
(predict_lib), exporting a SavedModel (export_lib) and Grad-CAM.
"""
