from nfqfw.cli import main

raise SystemExit(main())
