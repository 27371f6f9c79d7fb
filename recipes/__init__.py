"""Recipes shipped with turbocompile (YAML package data); see turbocompile.recipe."""
