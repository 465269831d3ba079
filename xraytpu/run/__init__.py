"""A run directory: its layout, what training left there, its operating point, its reports
and model card, and loading it back. No TensorFlow at import.
"""
