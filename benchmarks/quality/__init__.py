"""The quality benchmark's parts: models (what is sampled), methods (how), measures and timing (what
is measured), the run (in what order) and the report (tables, targets, plots)."""
