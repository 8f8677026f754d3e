"""In-process simulations: a TCP pair and an active-active firewall cluster."""
