"""`python -m rescomp` (what torchrun starts: `torchrun --nproc_per_node N -m rescomp train CONFIG`)."""

from rescomp.cli import main

main()
