"""cvkit: staged fine-tuning and competition tooling for image models on Catalyst, timm, smp and albumentations."""
__version__ = "0.1.0"
