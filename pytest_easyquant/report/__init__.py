"""The reports of a session: the records checks leave behind and what is built from them.

``records`` (typed metric and model-run records, JSON-safe for xdist), ``overview`` (per model
run: counts, headline metrics, per-layer series), ``charts`` (inline SVG), ``images`` (inline
PNGs), ``html`` (the dashboard), ``json_summary`` (``--eq-json`` and its schema), ``junit``
(JUnit XML properties). The terminal summary is ``pytest_easyquant.reporting``.
"""
