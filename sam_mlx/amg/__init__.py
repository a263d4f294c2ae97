"""Segment everything: the automatic mask generator and its mask utilities."""
