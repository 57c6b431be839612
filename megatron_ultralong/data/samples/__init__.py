"""The training-sample side: pretraining samples from `.bin/.idx`, SFT packing and chat rendering."""
