"""Entry points: compress / evaluate / finetune / distill / export / sweep as functions over frozen argument
dataclasses. The CLI and the sweep build those arguments; nothing below imports this layer."""
