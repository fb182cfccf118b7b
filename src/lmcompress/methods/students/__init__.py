"""Stages that replace the whole model by a student of another architecture: `dan`."""
