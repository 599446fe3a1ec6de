"""The demo: synthetic medical images with preference pairs and held-out questions (synthetic.py), and
the tiny backbones whose tokenizers are trained on their corpus (tiny.py, tiny_qwen.py)."""
