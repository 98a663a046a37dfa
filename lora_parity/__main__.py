"""``python -m lora_parity`` runs the CLI."""
import sys

from .cli import main

sys.exit(main())
