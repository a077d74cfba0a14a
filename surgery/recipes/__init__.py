"""Shipped recipes (TOML data, package data of surgery)."""
