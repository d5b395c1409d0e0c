"""TEI's gRPC API (tei.v1), served on --grpc-port (server.py)."""
