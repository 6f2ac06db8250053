"""cvkit's release number, in a module of its own so any layer can record it without importing the package."""
__version__ = "0.1.0"
