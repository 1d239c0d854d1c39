"""Efficient self-attention for transformers v5 models, plugged in through AttentionInterface."""
