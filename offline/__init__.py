"""What the offline packages (training/, quant/, evals/) share: benchmark files and their item readers, MCQ
training items from training splits only, the offline vLLM engine and reward-model scoring. It imports only the
core (zephyr/); the offline packages import it and the core, never each other (DESIGN.md §1)."""
