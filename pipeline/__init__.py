"""imprint: batch edit-friendly DDPM inversion and editing at dataset scale."""

__version__ = "0.1.0"
