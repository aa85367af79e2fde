from egstalker.cli import main

raise SystemExit(main())
