from stpcore.cli import main

raise SystemExit(main())
