"""Pretrained weights that ship inside registry packages (never downloaded at run time)."""
