"""Jobs: one featurize run (list, embed what changed, commit), export, map, verify, and the
doctor report. The command line and the Python API call these."""
