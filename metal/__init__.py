"""The Metal kernel sources, installed as ``flashhead_mlx.metal``."""
