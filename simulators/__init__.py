"""Virtual devices and the infrastructure to run them: a managed Mosquitto, sensor streams,
fleets of real agents. Used by the tests, the benchmarks and the demo."""
