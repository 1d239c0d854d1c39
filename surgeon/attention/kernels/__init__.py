"""Attention kernels: pure tensor functions, no transformers import.

Imports flow one way, from the leaves up:
- primitives.py: one fused call that also returns its log-sum-exp, the exact merge of two
  partial softmaxes, GQA key expansion; strips.py: overlapping key strips as a view;
- band.py: the sliding window's band — its plan of fused calls and running it;
- joint.py: the band plus a few extra keys in one softmax, with a fused backward;
- sliding_masked.py: the whole pattern as one masked call (short inputs);
- route.py: which of the two computes a given shape — the one place that decides;
- sliding.py (sliding window, dilation, global tokens) and short_range.py (the exact band beside
  Linformer's and the latent slots), which ask route.py and call the above;
- one method per file on top: blockwise.py, linformer.py, latent.py, lsh.py.
"""
