"""The teacher service: labels every example batch once, for all students."""
