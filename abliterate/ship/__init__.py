"""Shipping the edit: direction and Pareto files, model card, hub push, streaming apply, LoRA, verify."""
