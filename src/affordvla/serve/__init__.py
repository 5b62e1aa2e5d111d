"""Serving: exported policies behind an HTTP server (server.py, LitServe), its Python client and a Gradio demo.
Importing this package loads only the client; the server and demo import LitServe and Gradio when used."""

from affordvla.serve.client import ActAnswer, KeypointsAnswer, PolicyClient, ServeRequestError, ServeUnavailable

__all__ = ["ActAnswer", "KeypointsAnswer", "PolicyClient", "ServeRequestError", "ServeUnavailable"]
