"""Models and how they learn: the one learning step, losses, evaluation, the gate, export."""
