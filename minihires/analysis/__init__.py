"""Tools to look inside: where the LLM attends (probe), what a resolution costs (budget)."""
