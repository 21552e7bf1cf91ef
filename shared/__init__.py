"""The suite's common code: settings, telemetry, errors, channels, storage and the
server bootstrap. Importing this package imports nothing heavy; the light client
(:mod:`conveyor.shared.client`) and its dependencies need only grpcio and protobuf."""
