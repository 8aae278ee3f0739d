"""The student service: joins examples with the teacher's labels and trains continuously."""
