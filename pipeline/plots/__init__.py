"""`cepe plots`: static PNG/SVG figures of training and evaluation runs (tables.py reads, figures.py draws)."""
