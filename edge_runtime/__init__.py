"""Edge inference runtime for portable ultrasound and X-ray imaging."""

__version__ = "0.1.0"
