"""Data: datasets (ImageFolder, built-in), view sampling and exact replay."""
