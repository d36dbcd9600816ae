"""REPORT.md: every table of the paper beside our numbers.

- `writer`: the report stage's writer and `ctxrepro report` (`write_report`, `report_command`);
- `tables`: the tables, read from metrics/*.json;
- `plots`: the offline PNG plots under plots/report;
- `paper_numbers`: the paper's published values, typed, with their table and row.
"""
