"""The four torchrelay services. They never import each other: they talk through events."""
