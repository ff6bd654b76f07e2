"""Offline training of RADnet: synthetic phantoms, datasets, the paper's recipe and evaluation."""
