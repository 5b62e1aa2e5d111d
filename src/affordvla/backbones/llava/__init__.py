"""LLaVA-1.5 and RoboPoint / original-LLaVA checkpoints."""
