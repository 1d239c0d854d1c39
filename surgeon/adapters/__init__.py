"""Adapters that hang off existing modules (LoRA hosts share the same mechanism)."""
