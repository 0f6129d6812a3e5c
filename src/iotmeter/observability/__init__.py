"""What operators watch: Prometheus metrics (`metrics`) and OpenTelemetry traces (`tracing`).
Logs live in `iotmeter.logging`."""
