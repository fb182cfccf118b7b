"""Running task examples through a model to gather the statistics methods need: statistic collectors,
one-shot and sequential (block-by-block) collection, and the bounded block-input cache."""
