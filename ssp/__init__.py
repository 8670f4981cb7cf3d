"""ssp: Search Self-Play. The thin shell shared by every room: the `ssp` command line, typed configs and paths."""
