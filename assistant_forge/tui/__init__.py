"""`forge` with no arguments: a Textual app that guides the pipeline; a thin layer over core."""
