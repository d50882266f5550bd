"""The quantizers convert-weights offers (kept apart so that --help imports no numpy)."""

QUANTIZERS = ("search", "reference")
# The best measured choice on SmolLM2 (README, "Better 4-bit files").
DEFAULT_QUANTIZER = "search"
