"""align: preference optimization with LoRA.

SFT, then DPO whose reference is the frozen base with adapters disabled; every stage
writes a RunDir and is tracked in W&B. See README.md for the recipes.
"""

__version__ = "0.1.0"
