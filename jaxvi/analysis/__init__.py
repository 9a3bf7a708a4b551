"""Analyses over a trained model's public API: differential expression
(:mod:`jaxvi.analysis.de`) and likelihood comparison
(:mod:`jaxvi.analysis.likelihood_comparison`, which builds models and so is imported on its own).
"""
