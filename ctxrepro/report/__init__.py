"""REPORT.md: every table of the paper beside our numbers.

- `writer`: the report stage's writer and `ctxrepro report` (`write_report`, `report_command`);
- `tables`: the tables, read from metrics/*.json (pretraining, Tables 1 and 2, shared formatting);
- `sections`: sections 4.6, 4.2, 4.5.1 and 4.1 beside the paper;
- `probes`: the linear-probe table;
- `plots`: the offline PNG plots under plots/report;
- `paper_numbers`: the paper's published values, typed, with their table and row.
"""
