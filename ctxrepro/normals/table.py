"""Table 2 of the paper as published: the normals stage prints it beside its own row, and the report re-exports it.

No torch here: the report stage imports this module and must stay light.
"""

from __future__ import annotations

# Table 2 (NYUv2 surface normals, section 4.4): mean and median angular error in degrees (lower is better),
# % of pixels within 11.25, 22.5 and 30 degrees (higher is better).
PAPER_TABLE2 = (
    ("Scratch", (38.6, 26.5, 33.1, 46.8, 52.5)),
    ("Unsup. Tracking [57]", (34.2, 21.9, 35.7, 50.6, 57.0)),
    ("Ours", (33.2, 21.3, 36.0, 51.2, 57.8)),
    ("ImageNet Labels", (33.3, 20.8, 36.7, 51.7, 58.1)),
)
TABLE2_COLUMNS = ("mean", "median", "within_11.25", "within_22.5", "within_30")  # PAPER_TABLE2's value order
