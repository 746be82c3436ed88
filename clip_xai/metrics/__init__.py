"""Explanation-quality metrics: ``sensitivity`` (map stability under input perturbations)."""
