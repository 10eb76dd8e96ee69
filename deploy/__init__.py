"""Deployment files shipped with refold (package data): the Maven assembly of the Kafka broker."""
