"""The `zephyr` command line: the one package that wires the core (zephyr/) to the service and the offline
packages (training/, quant/, evals/). Nothing imports it back. Heavy imports happen inside the commands."""
