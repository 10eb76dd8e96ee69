"""Kafka access: one client factory, topics, the publisher, the schema registry topic, the command client."""
