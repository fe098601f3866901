"""Models by name (torchvision, digits, factories) and their offline data."""
