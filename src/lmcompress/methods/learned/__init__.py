"""Replacements trained on a layer's captured (x, y) pairs: `learned`."""
