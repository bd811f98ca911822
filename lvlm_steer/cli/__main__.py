"""``python -m lvlm_steer.cli ...`` (what ``accelerate launch -m lvlm_steer.cli`` runs)."""

from lvlm_steer.cli import main

raise SystemExit(main())
