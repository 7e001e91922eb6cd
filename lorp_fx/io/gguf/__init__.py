"""GGUF files: the header, llama.cpp's per-layer layout rules, pruned copies, requantized tensors."""
