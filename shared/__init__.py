"""The common library of torchrelay: events, bus, state, storage and the service runtime."""
