"""Pure functions from a FineTuneJob to a plan and owned objects: no I/O, no cluster, no torch."""
