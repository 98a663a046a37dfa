"""``python -m lora_parity`` runs the CLI."""
import sys

from lora_parity.cli import main

sys.exit(main())
