"""Bundled demo model, demo data and the scripts that make them."""
