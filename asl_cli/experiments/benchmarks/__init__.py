"""Timings against a peer measured in the same run: the operator against a copy, single layers
(paper Table 1), whole models (Table 5) and training steps (Table 2)."""
