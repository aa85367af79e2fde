"""egstalker: real-time audio-driven talking heads with 3D Gaussian Splatting."""

__version__ = "0.1.0"
