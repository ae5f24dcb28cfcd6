"""The proof: the weight certificate, completeness, logit parity, the gate and its negative controls."""
