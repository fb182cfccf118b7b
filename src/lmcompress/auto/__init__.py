"""`lmcompress auto`: the fastest (or smallest) model within the accuracy a user can lose, searched over chains
of the project's methods and verified on this machine (docs/auto.md).

This layer sits above `sweep` and below `cli`: it drives the engine, distillation and the latency table, and
knows nothing of argparse."""
