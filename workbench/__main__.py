import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports the command: an exit, as later, not a traceback
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
