"""The data front door: real models and text from PyPI (`assets`), plain text from wiki
markup and article splits (`text`), token tensors for calibration and evaluation
(`calibration`)."""
