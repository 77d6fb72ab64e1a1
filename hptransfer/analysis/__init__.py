"""From results.parquet to an answer (docs/science.md#from-a-sweep-to-an-answer).

load (read, check, group) -> optimum (per scale) -> laws (across scales) -> metrics
(the three transfer metrics, wider is better) -> analyze (orchestration) -> summary (summary.json)
-> report and plots (terminal, report.md, figures); predict uses the laws for a target run.
"""
