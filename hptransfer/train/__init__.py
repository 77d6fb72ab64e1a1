"""Training one model: param (the parameterization table) -> model -> optim -> data -> rules (batch and
duration) -> step (set up, one step, evaluate) -> loop (one run folder); coord (the coordinate check)."""
