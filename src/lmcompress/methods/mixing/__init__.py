"""Token mixing without attention: replace a block's self-attention by a parameter-free mixing (`fourier_mixing`)."""
