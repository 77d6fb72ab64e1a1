"""From results.parquet to an answer (SCIENCE.md, "From a sweep to an answer").

load (read, check, group) -> optimum (per scale) -> laws (across scales) -> metrics
(the three transfer metrics, wider is better) -> analyze (orchestration, summary.json)
-> report and plots (terminal, report.md, figures); predict uses the laws for a target run.
"""
