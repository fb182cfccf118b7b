"""Stages that train back what compression lost: `distill`."""
