"""``python -m train [hydra overrides]`` runs the training job (same as ``blayers-train``)."""

from .cli import train_main

if __name__ == "__main__":
    train_main()
