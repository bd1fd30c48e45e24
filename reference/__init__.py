"""Dense NumPy reference (the oracle) for super token attention. Slow and obvious; no torch."""

from .super_token import (association, cell_of_token, initial_super_tokens, mhsa, neighbourhood, pad_to_grid,
                          super_token_association, super_token_attention, tokens, update_super_tokens, upsample)

__all__ = ["super_token_attention", "super_token_association", "initial_super_tokens", "association",
           "update_super_tokens", "mhsa", "upsample", "pad_to_grid", "tokens", "neighbourhood", "cell_of_token"]
