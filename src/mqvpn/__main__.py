from mqvpn.cli import main

raise SystemExit(main())
