from segdist.cli import main

raise SystemExit(main())
