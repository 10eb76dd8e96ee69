"""Kafka access: topics, the publisher, the schema registry topic, the command client."""
