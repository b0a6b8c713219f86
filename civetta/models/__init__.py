"""Models built from civetta modules."""
