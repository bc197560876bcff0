"""owdfa-bench: the reference harness for Open-World DeepFake Attribution."""

__version__ = "0.1.0"
