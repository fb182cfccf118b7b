"""Bottom layer: the model-family table (anatomy), units, linear-layer helpers and progress bars."""
