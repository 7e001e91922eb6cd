"""Reading and writing: model loading and placement, text files, atomic output directories, GGUF files."""
