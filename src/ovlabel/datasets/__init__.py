"""Generated datasets with exact ground truth (the offline demo and quality benchmark)."""
