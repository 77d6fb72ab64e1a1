"""The run config: schema and validation, Hydra composition, derived arithmetic, the frozen form and its id.

schema (dataclasses, choices, checks) <- compose (Hydra) ; derived (torch-free arithmetic) ; frozen (YAML, id).
"""
