"""The audio-driven Gaussian head: canonical Gaussians, tri-plane field, deformation network, model folder."""
