"""tailtune: parameter-efficient fine-tuning of text classifiers on long-tailed label sets."""

__version__ = "0.1.0"
