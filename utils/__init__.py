"""Checkpoint download, verification and loading; inference tools."""
