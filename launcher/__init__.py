"""Loom's command line and process launchers."""
