pytest_plugins = ["torchrelay.shared.testing.fixtures"]
