"""The denoiser networks: an MLP for vector worlds, EDM's and ADM's U-Nets, and their weight loading."""
