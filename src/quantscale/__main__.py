from quantscale.cli import main

raise SystemExit(main())
