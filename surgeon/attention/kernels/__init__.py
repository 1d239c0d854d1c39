"""Attention kernels: pure tensor functions, one method per file, no transformers import."""
