"""`python -m abs_deploy.cli ...`, the form torchrun starts: `torchrun --nproc-per-node N -m
abs_deploy.cli search ...`."""

from abs_deploy.cli import main

main()
