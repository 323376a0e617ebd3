"""The gRPC edge: validation, proto <-> domain mapping, error mapping, the servicer."""
