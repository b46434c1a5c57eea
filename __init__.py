"""WanFit: Wan 2.1 / 2.2 video diffusion in the memory of an ordinary GPU."""
