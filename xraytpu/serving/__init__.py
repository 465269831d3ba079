"""Serving a run over HTTP: the request logic (service), the Starlette app and TF
Serving's REST shape (http_api), and request batching (batching).
"""
