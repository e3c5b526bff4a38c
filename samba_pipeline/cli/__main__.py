"""``python -m samba_pipeline.cli`` runs the samba-bids command line."""

import sys

from samba_pipeline.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
