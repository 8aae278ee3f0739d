"""The ground floor: config, wire format, Kafka clients, service plumbing, files and stores."""
