"""Shipped recipes: TOML data, installed as the package data of `surgery.recipes`."""
