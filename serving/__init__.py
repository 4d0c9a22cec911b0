"""Serving: the ``rapport`` command line and, later, the BentoML scoring service.

This is the top layer: it may import :mod:`rapport.training` and :mod:`rapport.features`.
"""
