"""Recipes: one YAML file per method with the paper's defaults (installed as sslfeatures.recipes)."""
