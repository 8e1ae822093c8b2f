"""Experiments built on the operator, the zoo and the engine; each writes CSVs and figures."""
