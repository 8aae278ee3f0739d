"""Running the whole pipeline on one machine: the embedded broker, `distill up`, its report."""
