"""The compression engine: recipes, the stage pipeline, budget allocation, score reuse and layer timing."""
