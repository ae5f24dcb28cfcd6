"""The weight edit: the fold kernel and its model walker, the refusal direction as a unit vector."""
