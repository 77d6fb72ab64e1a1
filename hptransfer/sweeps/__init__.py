"""Sweeps, in pipeline order: plan (sweep file -> runs) -> store (the sweep folder) -> launch (claim
runs, hand them to a backend: backends/) -> state (what each run is doing) -> collect (Parquet).
A job executes one run folder with a runner (runners/).
"""
