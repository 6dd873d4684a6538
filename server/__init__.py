"""loraplex.server: the serving engine and the gRPC front end."""
