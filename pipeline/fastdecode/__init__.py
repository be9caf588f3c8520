"""The decode fast path: GPU kernels for the memory-bound products of one decoding step.

`settings` (which paths may run, chosen once), `triton_support` (the plumbing every kernel module
shares), `absorbed` (the one dispatcher of the absorbed cross-attention), `absorbed_decode` /
`absorbed_kernels` (its CEPE-specific kernels), `decode_ops` / `decode_kernels` (generic one-token
GEMVs and split-KV attention) and `decode_packing` (q/k/v and gate/up as one product each). The
model (`pipeline/model`) calls only `absorbed` and `decode_ops`; off a GPU every entry point
computes the same thing with torch.
"""
