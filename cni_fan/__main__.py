"""`python -m cni_fan ...` is `cni-fan ...` (the agent starts its plugin server this way)."""
from cni_fan.cli import main

main()
